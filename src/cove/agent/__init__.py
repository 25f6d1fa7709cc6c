"""The node agent. For now it registers its node and heartbeats; runtime drivers,
supervisors and the edge arrive with the deploy issue."""
