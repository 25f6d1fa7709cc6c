// The cove web console: the whole page is a terminal (ghostty-web, libghostty-vt in WASM).
// Sign-in happens in the terminal itself; then the terminal is bridged over a WebSocket
// (/console/ws) to a PTY on the server running `cove shell` as the signed-in user.
// Protocol: docs/api.md, "The web console".
import { FitAddon, Ghostty, Terminal } from "./ghostty-web.js";

const SUBPROTOCOL = "cove.console.v1";
const BEARER = "cove.bearer.";
const TOKEN_RE = /^cove_[a-z]_[A-Za-z0-9_-]{8,}$/;
const encoder = new TextEncoder();

const BOLD = "\x1b[1m";
const DIM = "\x1b[2m";
const RED = "\x1b[31m";
const GREEN = "\x1b[32m";
const RESET = "\x1b[0m";

class Cancelled extends Error {}

// state is read by the browser tests (tests/e2e/test_console.py) through window.coveConsole
const state = {
  phase: "loading", // loading | signin | connecting | connected | closed
  email: null,
  token: null,
  ownToken: false, // a session token this page made (revoked when the page goes away)
  ws: null,
  opened: false,
  exitCode: null,
  closeCode: null,
  errors: [],
};

const ghostty = await Ghostty.load(new URL("./ghostty-vt.wasm", import.meta.url).href);
const term = new Terminal({
  ghostty,
  cursorBlink: true,
  fontSize: 14,
  fontFamily: '"DejaVu Sans Mono", "Liberation Mono", ui-monospace, monospace',
  scrollback: 5000,
  theme: {
    background: "#15171c",
    foreground: "#d8dee9",
    cursor: "#d8dee9",
    selectionBackground: "#3b4252",
    black: "#3b4252",
    red: "#e06c75",
    green: "#98c379",
    yellow: "#e5c07b",
    blue: "#61afef",
    magenta: "#c678dd",
    cyan: "#56b6c2",
    white: "#d8dee9",
    brightBlack: "#6b7385",
    brightRed: "#ff7b86",
    brightGreen: "#b5e890",
    brightYellow: "#ffd68a",
    brightBlue: "#7cc4ff",
    brightMagenta: "#de9bf0",
    brightCyan: "#7fd6e0",
    brightWhite: "#ffffff",
  },
});
const fit = new FitAddon();
term.loadAddon(fit);
term.open(document.getElementById("terminal"));
fit.fit();
fit.observeResize();
window.addEventListener("resize", () => fit.fit());
term.focus();

function lines() {
  const buf = term.buffer.active;
  const out = [];
  for (let y = 0; y < buf.length; y++) {
    const line = buf.getLine(y);
    out.push(line ? line.translateToString(true) : "");
  }
  return out;
}

window.coveConsole = { term, fit, state, lines };

// --------------------------------------------------------------------------- input

let lineHandler = null; // while signing in, keystrokes go to the line editor

term.onData((data) => {
  if (state.phase === "connected" && state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(encoder.encode(data));
  } else if (lineHandler) {
    lineHandler(data);
  }
});

term.onResize(() => sendResize());

function sendResize() {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
  }
}

// One line typed in the terminal: Enter ends it, Backspace and Ctrl-U edit it, Ctrl-C
// cancels; with echo false (passwords) nothing typed is shown.
function readLine(prompt, { echo = true } = {}) {
  term.write(prompt);
  return new Promise((resolve, reject) => {
    let chars = [];
    lineHandler = (data) => {
      if (data.startsWith("\x1b")) return; // arrows, function keys: no line history here
      for (const ch of data) {
        if (ch === "\r" || ch === "\n") {
          lineHandler = null;
          term.write("\r\n");
          resolve(chars.join(""));
          return;
        }
        if (ch === "\x03") {
          lineHandler = null;
          term.write("^C\r\n");
          reject(new Cancelled());
          return;
        }
        if (ch === "\x7f" || ch === "\b") {
          if (chars.length) {
            chars.pop();
            if (echo) term.write("\b \b");
          }
          continue;
        }
        if (ch === "\x15") {
          if (echo) term.write("\b \b".repeat(chars.length));
          chars = [];
          continue;
        }
        if (ch < " ") continue; // other control characters
        chars.push(ch);
        if (echo) term.write(ch);
      }
    };
  });
}

function say(text) {
  term.write(text.replace(/\n/g, "\r\n"));
}

function problemText(doc, status) {
  const detail = (doc && (doc.detail || doc.title)) || `HTTP ${status}`;
  const hint = doc && doc.hint ? ` (${doc.hint})` : "";
  return `${detail}${hint}`;
}

// --------------------------------------------------------------------------- sign-in

async function signIn() {
  state.phase = "signin";
  say(`${BOLD}cove console${RESET} ${DIM}${location.host}${RESET}\n`);
  say("Sign in with your email and password (the password is not shown),\n");
  say("or paste an API token (cove_a_...) at the first prompt.\n\n");
  for (;;) {
    try {
      const who = (await readLine("email or token: ")).trim();
      if (!who) continue;
      if (TOKEN_RE.test(who)) {
        if (await useToken(who)) return;
        continue;
      }
      const password = await readLine("password: ", { echo: false });
      const resp = await fetch("/v1/auth/login", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ email: who, password }),
      });
      const doc = await resp.json().catch(() => ({}));
      if (!resp.ok) {
        say(`${RED}sign-in failed${RESET}: ${problemText(doc, resp.status)}\n\n`);
        continue;
      }
      state.token = doc.token;
      state.ownToken = true;
      state.email = doc.user.email;
      say(`${GREEN}signed in${RESET} as ${state.email}\n`);
      return;
    } catch (err) {
      if (err instanceof Cancelled) continue;
      say(`${RED}error${RESET}: ${err}\n\n`);
    }
  }
}

async function useToken(token) {
  const resp = await fetch("/v1/auth/whoami", { headers: { Authorization: `Bearer ${token}` } });
  const doc = await resp.json().catch(() => ({}));
  if (!resp.ok || doc.kind !== "user") {
    say(`${RED}that token does not sign in${RESET}: ${problemText(doc, resp.status)}\n\n`);
    return false;
  }
  state.token = token;
  state.ownToken = false;
  state.email = doc.user.email;
  const kind = doc.token.kind === "api" ? "an API token" : `a ${doc.token.kind} token`;
  say(`${GREEN}signed in${RESET} as ${state.email} (with ${kind})\n`);
  return true;
}

// --------------------------------------------------------------------------- the session

function connect() {
  return new Promise((resolve) => {
    state.phase = "connecting";
    state.opened = false;
    state.exitCode = null;
    const url = new URL("/console/ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(url, [SUBPROTOCOL, BEARER + state.token]);
    ws.binaryType = "arraybuffer";
    state.ws = ws;
    ws.onopen = () => {
      state.opened = true;
      state.phase = "connected";
      sendResize();
      term.focus();
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data !== "string") {
        term.write(new Uint8Array(ev.data));
        return;
      }
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (msg.type === "exit") {
        state.exitCode = msg.code;
      } else if (msg.type === "error") {
        state.errors.push(msg);
        say(`\n${RED}[${msg.detail || msg.code}]${RESET}\n`);
      }
    };
    ws.onclose = (ev) => {
      state.ws = null;
      state.phase = "closed";
      state.closeCode = ev.code;
      resolve(ws);
    };
  });
}

async function main() {
  await signIn();
  for (;;) {
    say(`${DIM}connecting...${RESET}\n`);
    const ws = await connect();
    if (!state.opened) {
      // refused before the handshake completed: the token expired or was revoked
      say(`${RED}the console refused the connection${RESET}; sign in again\n\n`);
      state.token = null;
      await signIn();
      continue;
    }
    const why =
      state.exitCode !== null ? `cove shell exited (code ${state.exitCode})` : "disconnected";
    say(`\n${DIM}[${why}]${RESET}\n`);
    void ws;
    try {
      await readLine("press Enter for a new session ");
    } catch (err) {
      if (!(err instanceof Cancelled)) throw err;
    }
  }
}

// a session token this page made is revoked when the page goes away (API tokens are not)
window.addEventListener("pagehide", () => {
  if (state.token && state.ownToken) {
    fetch("/v1/auth/logout", {
      method: "POST",
      headers: { Authorization: `Bearer ${state.token}` },
      keepalive: true,
    });
  }
});

main();
