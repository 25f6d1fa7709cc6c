/*
 * cove-init: PID 1 inside a cove microVM.
 *
 * Runs from the initramfs: mounts /dev /proc /sys, loads the kernel modules listed in
 * /modules/order (finit_module, in order), then looks for the virtio-serial port `cove.ctl`.
 *
 * Protocol mode (the port exists; PROTOCOL.md): init sends HELLO, receives the CONFIG,
 * mounts the root ext4 disk and switches into it, sets the host name, mounts the volumes,
 * configures lo/eth0, writes the secrets, starts the command with its stdout/stderr on
 * pipes forwarded as frames, runs exec sessions (pipes or a pty), handles STOP, pings the
 * host every second, and when the command is gone sends EXIT, kills what is left, syncs,
 * unmounts the volumes and powers the VM off.
 *
 * File mode (no port): reads the command config the host wrote into the root disk, runs
 * that command with its stdout/stderr on the console, reaps every zombie, forwards
 * SIGTERM/SIGINT to the command, and when the command exits prints one machine-readable line
 *
 *     cove-init: exit N        (the command exited with status N)
 *     cove-init: signal N      (the command was killed by signal N)
 *
 * then syncs and powers the VM off. Any setup failure prints
 *
 *     cove-init: fatal: <what>: <strerror>
 *
 * (and in protocol mode sends it as a FATAL frame) and powers off too. See README.md.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define NEWROOT "/newroot"
#define DEFAULT_ROOT "/dev/vda"
#define DEFAULT_CONFIG "/.cove/config"
#define MAX_CONFIG (1024 * 1024)
#define MAX_ENTRIES 4096
#define MAX_GROUPS 1024
#define MAX_VOLUMES 64
#define PORT_NAME "cove.ctl"
#define VOLUMES_DIR "/.cove/volumes"

/* frame types (PROTOCOL.md) */
enum {
    F_HELLO = 0x01,
    F_STARTED = 0x02,
    F_STDOUT = 0x03,
    F_STDERR = 0x04,
    F_EXIT = 0x05,
    F_FATAL = 0x06,
    F_EXEC_STARTED = 0x07,
    F_PING = 0x08,
    F_CONFIG = 0x10,
    F_STOP = 0x11,
    F_EXEC = 0x12,
    F_STDIN = 0x13,
    F_RESIZE = 0x14,
    F_SIGNAL = 0x15,
};
#define MAX_FRAME (1024 * 1024) /* type + channel + payload */
#define MAX_DATA (64 * 1024)
#define MAX_STDIN_BUF (1024 * 1024)
#define MAX_SESSIONS 64 /* [0] is the command; up to 63 concurrent execs */
#define EOF_GRACE_MS 2000
#define CONFIG_WAIT_MS 60000

extern char **environ;

static int console_fd = 2;
static int port_fd = -1;     /* the cove.ctl port (protocol mode), else -1 */
static int port_broken;      /* a write to the port failed: stop sending */
static int command_started;  /* protocol mode: the command was forked */
/* The command and every exec run in one cgroup (v2) whose pids.max is the instance's
 * limit: children join it before they exec (child_exec). */
#define APP_CGROUP "/sys/fs/cgroup/cove"
static int app_cgroup_ready;

static void send_frame(int type, uint32_t ch, const void *payload, size_t len);
static void fatal_after_start(void) __attribute__((noreturn));

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    char buf[1024];
    int n = snprintf(buf, sizeof buf, "cove-init: ");
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0) m = 0;
    size_t len = (size_t)n + (size_t)m;
    if (len > sizeof buf - 2) len = sizeof buf - 2;
    buf[len++] = '\n';
    ssize_t w = write(console_fd, buf, len);
    (void)w;
}

static void power_off(void) __attribute__((noreturn));
static void power_off(void) {
    sync();
    reboot(RB_POWER_OFF);
    /* no power-off path: reboot, which QEMU turns into an exit under -no-reboot */
    reboot(RB_AUTOBOOT);
    for (;;) pause();
}

/* Setup failed: say why on the console (and as FATAL ch 0 in protocol mode), power off. */
static void fatal(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void fatal(const char *fmt, ...) {
    char what[768], msg[1024];
    int err = errno;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (err)
        snprintf(msg, sizeof msg, "%s: %s", what, strerror(err));
    else
        snprintf(msg, sizeof msg, "%s", what);
    say("fatal: %s", msg);
    send_frame(F_FATAL, 0, msg, strlen(msg));
    if (command_started) fatal_after_start();
    power_off();
}

/* Make fds 0, 1, 2 the console (stdin /dev/null). */
static void open_console(void) {
    int fd = open("/dev/console", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (fd < 0) return;
    dup2(fd, 1);
    dup2(fd, 2);
    int nul = open("/dev/null", O_RDONLY);
    dup2(nul >= 0 ? nul : fd, 0);
    if (nul > 2) close(nul);
    if (fd > 2) close(fd);
    console_fd = 2;
}

static void mkdir_p(const char *path, mode_t mode) {
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            mkdir(buf, mode);
            *p = '/';
        }
    }
    mkdir(buf, mode);
}

static void must_mount(const char *src, const char *dst, const char *type, unsigned long flags,
                       const char *data) {
    mkdir_p(dst, 0755);
    if (mount(src, dst, type, flags, data) != 0 && errno != EBUSY)
        fatal("mount %s on %s", type ? type : src, dst);
}

/* Read a whole file (at most max bytes) into a NUL-terminated buffer. */
static char *read_file(const char *path, size_t max, size_t *len_out) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NULL;
    char *buf = malloc(max + 1);
    if (!buf) fatal("out of memory");
    size_t len = 0;
    for (;;) {
        ssize_t r = read(fd, buf + len, max - len);
        if (r < 0) {
            if (errno == EINTR) continue;
            int e = errno;
            close(fd);
            free(buf);
            errno = e;
            return NULL;
        }
        if (r == 0) break;
        len += (size_t)r;
        if (len == max) {
            char extra;
            if (read(fd, &extra, 1) > 0) {
                close(fd);
                free(buf);
                errno = EFBIG;
                return NULL;
            }
            break;
        }
    }
    close(fd);
    buf[len] = 0;
    if (len_out) *len_out = len;
    return buf;
}

static int write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

static int write_text_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = write_all(fd, text, strlen(text));
    close(fd);
    return rc;
}

/* cove.<key>=value from /proc/cmdline, or def. Values have no spaces. */
static const char *cmdline_param(const char *cmdline, const char *key, const char *def) {
    static char out[4][256];
    static int slot;
    char pat[64];
    snprintf(pat, sizeof pat, "cove.%s=", key);
    size_t plen = strlen(pat);
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ' || *p == '\n') p++;
        if (strncmp(p, pat, plen) == 0) {
            const char *v = p + plen;
            size_t n = strcspn(v, " \n");
            char *o = out[slot++ % 4];
            if (n >= sizeof out[0]) n = sizeof out[0] - 1;
            memcpy(o, v, n);
            o[n] = 0;
            return o;
        }
        p += strcspn(p, " \n");
    }
    return def;
}

static void load_modules(void) {
    size_t len;
    char *order = read_file("/modules/order", 64 * 1024, &len);
    if (!order) {
        if (errno == ENOENT) return;
        fatal("read /modules/order");
    }
    char *save = NULL;
    for (char *name = strtok_r(order, "\n", &save); name; name = strtok_r(NULL, "\n", &save)) {
        if (!*name) continue;
        char path[512];
        snprintf(path, sizeof path, "/modules/%s", name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) fatal("open module %s", path);
        if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST)
            fatal("load module %s", name);
        close(fd);
        unlink(path); /* the initramfs stays in RAM: free what is no longer needed */
    }
    free(order);
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000 * 1000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static void wait_for(const char *path, int timeout_ms, const char *what) {
    for (int waited = 0; waited < timeout_ms; waited += 10) {
        if (access(path, F_OK) == 0) return;
        sleep_ms(10);
    }
    errno = ENOENT;
    fatal("%s %s did not appear", what, path);
}

static void move_into(const char *from, const char *to) {
    mkdir_p(to, 0755);
    if (mount(from, to, NULL, MS_MOVE, NULL) != 0) fatal("move %s to %s", from, to);
}

static void switch_root(const char *root_dev, const char *fstype) {
    wait_for(root_dev, 5000, "root device");
    mkdir_p(NEWROOT, 0755);
    if (mount(root_dev, NEWROOT, fstype, 0, NULL) != 0)
        fatal("mount %s (%s) on " NEWROOT, root_dev, fstype);
    move_into("/dev", NEWROOT "/dev");
    move_into("/proc", NEWROOT "/proc");
    move_into("/sys", NEWROOT "/sys");
    if (chdir(NEWROOT) != 0) fatal("chdir " NEWROOT);
    if (mount(".", "/", NULL, MS_MOVE, NULL) != 0) fatal("move " NEWROOT " to /");
    if (chroot(".") != 0) fatal("chroot");
    if (chdir("/") != 0) fatal("chdir /");
    mkdir_p("/dev/pts", 0755);
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666");
    mkdir_p("/dev/shm", 01777);
    mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
}

/* ---- the command description: CONFIG / the config file, and EXEC ---------------------- */

/* What to run (the command, or an exec session). */
struct spec {
    char *argv[MAX_ENTRIES + 1];
    char *envp[MAX_ENTRIES + 1];
    size_t argc, envc;
    const char *workdir;
    uid_t uid;
    gid_t gid;
    gid_t groups[MAX_GROUPS];
    size_t ngroups;
    int tty;
    unsigned short rows, cols;
};

struct config {
    struct spec run;
    int version_seen;
    const char *hostname;
    char *volumes[MAX_VOLUMES];
    size_t nvolumes;
    const char *ip4, *ip6, *gw4, *gw6;
    const char *secrets;
    unsigned long pids_max; /* 0: no limit */
};

enum rec_kind { REC_FILE, REC_CONFIG, REC_EXEC };

static int parse_ulong(const char *s, unsigned long max, unsigned long *out) {
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || !*s || *end || v > max || *s == '-' || *s == '+' || *s == ' ') return -1;
    *out = v;
    return 0;
}

#define BAD(...)                                  \
    do {                                          \
        snprintf(err, errlen, __VA_ARGS__);       \
        return -1;                                \
    } while (0)

/* A key every kind knows: arg, env, workdir, uid, gid (group too, except in the file). */
static int spec_record(struct spec *s, enum rec_kind kind, const char *k, char *v, char *err,
                       size_t errlen) {
    unsigned long n;
    const char *what = kind == REC_EXEC ? "exec" : "config";
    if (strcmp(k, "arg") == 0) {
        if (s->argc >= MAX_ENTRIES) BAD("%s: more than %d args", what, MAX_ENTRIES);
        s->argv[s->argc++] = v;
    } else if (strcmp(k, "env") == 0) {
        if (s->envc >= MAX_ENTRIES) BAD("%s: more than %d env entries", what, MAX_ENTRIES);
        s->envp[s->envc++] = v;
    } else if (strcmp(k, "workdir") == 0) {
        s->workdir = v;
    } else if (strcmp(k, "uid") == 0) {
        if (parse_ulong(v, 0xfffffffeUL, &n)) BAD("%s: bad uid '%s'", what, v);
        s->uid = (uid_t)n;
    } else if (strcmp(k, "gid") == 0) {
        if (parse_ulong(v, 0xfffffffeUL, &n)) BAD("%s: bad gid '%s'", what, v);
        s->gid = (gid_t)n;
    } else if (strcmp(k, "group") == 0 && kind != REC_FILE) {
        if (parse_ulong(v, 0xfffffffeUL, &n)) BAD("%s: bad group '%s'", what, v);
        if (s->ngroups >= MAX_GROUPS) BAD("%s: more than %d groups", what, MAX_GROUPS);
        s->groups[s->ngroups++] = (gid_t)n;
    } else {
        return 1; /* not mine */
    }
    return 0;
}

/* A CONFIG (or config file) key that is not a spec key. */
static int config_record(struct config *c, enum rec_kind kind, const char *k, char *v,
                         char *err, size_t errlen) {
    if (strcmp(k, "version") == 0) {
        if (strcmp(v, "1") != 0) BAD("config: unsupported version %s", v);
        c->version_seen = 1;
    } else if (strcmp(k, "hostname") == 0) {
        c->hostname = v;
    } else if (kind == REC_FILE) {
        return 1;
    } else if (strcmp(k, "volume") == 0) {
        if (c->nvolumes >= MAX_VOLUMES) BAD("config: more than %d volumes", MAX_VOLUMES);
        c->volumes[c->nvolumes++] = v;
    } else if (strcmp(k, "ip4") == 0) {
        c->ip4 = v;
    } else if (strcmp(k, "ip6") == 0) {
        c->ip6 = v;
    } else if (strcmp(k, "gw4") == 0) {
        c->gw4 = v;
    } else if (strcmp(k, "gw6") == 0) {
        c->gw6 = v;
    } else if (strcmp(k, "secrets") == 0) {
        c->secrets = v;
    } else if (strcmp(k, "pids_max") == 0) {
        if (parse_ulong(v, 4194304, &c->pids_max) != 0 || c->pids_max == 0)
            BAD("config: bad pids_max %s", v);
    } else {
        return 1;
    }
    return 0;
}

static int exec_record(struct spec *s, const char *k, char *v, char *err, size_t errlen) {
    unsigned long n;
    if (strcmp(k, "tty") == 0) {
        if (strcmp(v, "0") != 0 && strcmp(v, "1") != 0) BAD("exec: bad tty '%s'", v);
        s->tty = v[0] == '1';
    } else if (strcmp(k, "rows") == 0 || strcmp(k, "cols") == 0) {
        if (parse_ulong(v, 0xffff, &n)) BAD("exec: bad %s '%s'", k, v);
        if (k[0] == 'r')
            s->rows = (unsigned short)n;
        else
            s->cols = (unsigned short)n;
    } else {
        return 1;
    }
    return 0;
}

/* Parse NUL-terminated key=value records (buf[len] must be 0) into c (CONFIG, file) or s
 * (EXEC). Returns 0, or -1 with a message in err. Values point into buf. */
static int parse_records(char *buf, size_t len, enum rec_kind kind, struct config *c,
                         struct spec *s, char *err, size_t errlen) {
    const char *what = kind == REC_EXEC ? "exec" : "config";
    memset(s, 0, sizeof *s);
    if (c) memset(c, 0, sizeof *c);
    s->workdir = "/";
    s->rows = 24;
    s->cols = 80;
    for (char *p = buf, *next; p < buf + len; p = next) {
        next = p + strlen(p) + 1;
        char *eq = strchr(p, '=');
        if (!eq) BAD("%s: record without '=': '%.40s'", what, p);
        *eq = 0;
        char *v = eq + 1;
        int r = spec_record(s, kind, p, v, err, errlen);
        if (r == 1) r = kind == REC_EXEC ? exec_record(s, p, v, err, errlen)
                                         : config_record(c, kind, p, v, err, errlen);
        if (r < 0) return -1;
        if (r == 1) BAD("%s: unknown key '%s'", what, p);
    }
    if (c && !c->version_seen) BAD("config: no version record");
    if (s->argc == 0) BAD("%s: no command (no arg records)", what);
    return 0;
}
#undef BAD

/* The config file (file mode). */
static void read_config(const char *path, struct config *c) {
    size_t len;
    char *buf = read_file(path, MAX_CONFIG, &len);
    if (!buf) fatal("read config %s", path);
    char err[256];
    if (parse_records(buf, len, REC_FILE, c, &c->run, err, sizeof err) != 0) {
        errno = 0;
        fatal("%s", err);
    }
}

/* ---- starting a process ------------------------------------------------------------- */

enum io_mode { IO_INHERIT, IO_PIPES_NO_STDIN, IO_PIPES, IO_TTY };

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

/* In the child: become what s describes and exec it; on failure report (step, errno) on
 * errfd and exit 127 (not found) / 126 (not executable) / 125 (chdir or id change). */
static void child_exec(const struct spec *s, int errfd, int in, int out, int err, int tty)
    __attribute__((noreturn));
static void child_exec(const struct spec *s, int errfd, int in, int out, int err, int tty) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGTERM, &dfl, NULL);
    sigaction(SIGINT, &dfl, NULL);
    sigaction(SIGHUP, &dfl, NULL);
    setsid();
    if (app_cgroup_ready && write_text_file(APP_CGROUP "/cgroup.procs", "0") != 0) {
        int report[2] = {6, errno};
        ssize_t w = write(errfd, report, sizeof report);
        (void)w;
        _exit(125);
    }
    if (tty >= 0) ioctl(tty, TIOCSCTTY, 0);
    if (in >= 0) dup2(in, 0);
    if (out >= 0) dup2(out, 1);
    if (err >= 0) dup2(err, 2);
    int step = 0;
    if (chdir(s->workdir) != 0)
        step = 1;
    else if (setgroups(s->ngroups, s->ngroups ? s->groups : NULL) != 0)
        step = 2;
    else if (setgid(s->gid) != 0)
        step = 3;
    else if (setuid(s->uid) != 0)
        step = 4;
    if (step == 0) {
        environ = (char **)s->envp; /* execvp looks PATH up in the new environment */
        execvp(s->argv[0], (char **)s->argv);
        step = 5;
    }
    int report[2] = {step, errno};
    ssize_t w = write(errfd, report, sizeof report);
    (void)w;
    _exit(step == 5 ? (report[1] == ENOENT ? 127 : 126) : 125);
}

/* Wait for the child's exec (the CLOEXEC error pipe closes) or its failure report. Returns
 * 0, or -1 with the reason in msg. */
static int exec_result(int errfd, const struct spec *s, char *msg, size_t msglen) {
    int report[2];
    ssize_t r;
    do r = read(errfd, report, sizeof report);
    while (r < 0 && errno == EINTR);
    if (r != (ssize_t)sizeof report) return 0;
    static const char *steps[] = {"", "chdir to workdir", "setgroups", "setgid", "setuid",
                                  "exec", "join the pids cgroup"};
    int step = report[0] >= 1 && report[0] <= 6 ? report[0] : 5;
    const char *err = strerror(report[1]);
    if (step == 6)
        snprintf(msg, msglen, "%s: %s", steps[step], err);
    else if (step == 1)
        snprintf(msg, msglen, "%s %s: %s", steps[step], s->workdir, err);
    else if (step == 5)
        snprintf(msg, msglen, "%s %s: %s", steps[step], s->argv[0], err);
    else
        snprintf(msg, msglen, "%s %u:%u: %s", steps[step], (unsigned)s->uid, (unsigned)s->gid,
                 err);
    return -1;
}

/* Pipes (or a pty) for the child; parent ends in p[0..2] (stdin, stdout, stderr; for a
 * tty all three are the master), child ends in c[0..2], the tty slave in *slave. */
static int make_io(enum io_mode mode, const struct spec *s, int p[3], int c[3], int *slave) {
    p[0] = p[1] = p[2] = c[0] = c[1] = c[2] = *slave = -1;
    if (mode == IO_INHERIT) return 0;
    if (mode == IO_TTY) {
        int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (m < 0) return -1;
        struct winsize ws = {.ws_row = s->rows, .ws_col = s->cols};
        const char *name;
        if (fcntl(m, F_SETFD, FD_CLOEXEC) != 0 || grantpt(m) != 0 || unlockpt(m) != 0 ||
            !(name = ptsname(m)) || ioctl(m, TIOCSWINSZ, &ws) != 0 ||
            (*slave = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0) {
            close(m);
            return -1;
        }
        p[0] = p[1] = p[2] = m;
        c[0] = c[1] = c[2] = *slave;
        return fcntl(m, F_SETFL, O_NONBLOCK) != 0 ? -1 : 0;
    }
    int fds[2];
    for (int i = mode == IO_PIPES ? 0 : 1; i < 3; i++) {
        if (pipe2(fds, O_CLOEXEC) != 0) return -1;
        p[i] = i == 0 ? fds[1] : fds[0];
        c[i] = i == 0 ? fds[0] : fds[1];
        /* init's ends never block it: a full stdin buffer or a stale poll result waits */
        if (fcntl(p[i], F_SETFL, O_NONBLOCK) != 0) return -1;
    }
    return 0;
}

static void close_io(int p[3], int c[3], int *slave) {
    if (*slave >= 0) {
        close_fd(slave);
        close_fd(&p[0]); /* the master */
        p[1] = p[2] = c[0] = c[1] = c[2] = -1;
        return;
    }
    for (int i = 0; i < 3; i++) {
        close_fd(&p[i]);
        close_fd(&c[i]);
    }
}

/* Fork and exec s. Returns the pid (the parent's ends of its stdio in fds) or -1 with msg
 * (nothing was started). When the exec itself failed, *failed is set and msg says why: the
 * child has exited 127/126/125 and is reaped as usual. */
static pid_t spawn(const struct spec *s, enum io_mode mode, int fds[3], int *failed, char *msg,
                   size_t msglen) {
    int c[3], slave, errpipe[2];
    *failed = 0;
    if (make_io(mode, s, fds, c, &slave) != 0) {
        snprintf(msg, msglen, "%s: %s", mode == IO_TTY ? "open pty" : "pipe", strerror(errno));
        close_io(fds, c, &slave);
        return -1;
    }
    if (pipe2(errpipe, O_CLOEXEC) != 0) {
        snprintf(msg, msglen, "pipe: %s", strerror(errno));
        close_io(fds, c, &slave);
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(msg, msglen, "fork: %s", strerror(errno));
        close_io(fds, c, &slave);
        close(errpipe[0]);
        close(errpipe[1]);
        return -1;
    }
    if (pid == 0) child_exec(s, errpipe[1], c[0], c[1], c[2], slave);
    close(errpipe[1]);
    *failed = exec_result(errpipe[0], s, msg, msglen) != 0;
    close(errpipe[0]);
    /* the slave stays open until the child has exec'd: no early EOF on the master */
    if (slave >= 0)
        close_fd(&slave);
    else
        for (int i = 0; i < 3; i++) close_fd(&c[i]);
    return pid;
}

/* ---- file mode (no cove.ctl port) --------------------------------------------------- */

static volatile sig_atomic_t pending_signal;

static void on_signal(int sig) { pending_signal = sig; }

static void file_mode(const char *config_path, const char *root_dev, const char *fstype)
    __attribute__((noreturn));
static void file_mode(const char *config_path, const char *root_dev, const char *fstype) {
    static struct config fcfg;
    switch_root(root_dev, fstype);
    read_config(config_path, &fcfg);
    if (fcfg.hostname && sethostname(fcfg.hostname, strlen(fcfg.hostname)) != 0)
        fatal("sethostname %s", fcfg.hostname);

    /* Ctrl-Alt-Del becomes SIGINT to us (a graceful-stop hook); forward TERM/INT/HUP. */
    reboot(RB_DISABLE_CAD);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);

    int fds[3], failed;
    char msg[1024];
    pid_t child = spawn(&fcfg.run, IO_INHERIT, fds, &failed, msg, sizeof msg);
    if (child < 0) {
        errno = 0;
        fatal("%s", msg);
    }
    if (failed) say("fatal: %s", msg);

    int status = 0;
    for (;;) {
        int st;
        if (pending_signal) {
            int sig = pending_signal;
            pending_signal = 0;
            kill(-child, sig == SIGINT ? SIGTERM : sig);
        }
        pid_t pid = waitpid(-1, &st, 0);
        if (pid < 0) {
            if (errno == EINTR) continue;
            if (errno == ECHILD) break;
            fatal("waitpid");
        }
        if (pid == child) {
            status = st;
            break;
        }
    }

    /* the main program is gone: stop whatever it left behind, then report */
    kill(-1, SIGKILL);
    while (waitpid(-1, NULL, 0) > 0 || errno == EINTR) {
    }
    sync();
    if (WIFSIGNALED(status))
        say("signal %d", WTERMSIG(status));
    else
        say("exit %d", WEXITSTATUS(status));
    power_off();
}

/* ---- the cove.ctl port -------------------------------------------------------------- */

static void put_be32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static uint32_t get_be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* One frame, written fully (the port blocks while the host is not reading). */
static void send_frame(int type, uint32_t ch, const void *payload, size_t len) {
    if (port_fd < 0 || port_broken) return;
    unsigned char hdr[9];
    put_be32(hdr, (uint32_t)(len + 5));
    hdr[4] = (unsigned char)type;
    put_be32(hdr + 5, ch);
    if (write_all(port_fd, hdr, sizeof hdr) != 0 || write_all(port_fd, payload, len) != 0) {
        port_broken = 1;
        say("write to " PORT_NAME ": %s (no more frames are sent)", strerror(errno));
    }
}

static void send_text(int type, uint32_t ch, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void send_text(int type, uint32_t ch, const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n >= sizeof buf) n = sizeof buf - 1;
    send_frame(type, ch, buf, (size_t)n);
}

/* Whether a virtio console device exists at all (then its ports may still be coming). */
static int virtio_console_present(void) {
    DIR *d = opendir("/sys/bus/virtio/devices");
    if (!d) return 0;
    int found = 0;
    struct dirent *e;
    while (!found && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char path[512];
        snprintf(path, sizeof path, "/sys/bus/virtio/devices/%s/device", e->d_name);
        char *id = read_file(path, 64, NULL);
        if (id && strtoul(id, NULL, 0) == 3) found = 1; /* VIRTIO_ID_CONSOLE */
        free(id);
    }
    closedir(d);
    return found;
}

/* /dev/<vportXpY> of the port named cove.ctl, when it is there. */
static int find_port(char *dev, size_t devlen) {
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d) return -1;
    int rc = -1;
    struct dirent *e;
    while (rc != 0 && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char path[512];
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        char *name = read_file(path, 256, NULL);
        if (name && strcmp(strtok(name, "\n") ? name : "", PORT_NAME) == 0) {
            snprintf(dev, devlen, "/dev/%s", e->d_name);
            rc = 0;
        }
        free(name);
    }
    closedir(d);
    return rc;
}

/* The port, waiting up to 2 s for it when there is a virtio console device; else -1. */
static int open_port(void) {
    char dev[300];
    for (int waited = 0;; waited += 10) {
        if (find_port(dev, sizeof dev) == 0) {
            int fd = open(dev, O_RDWR | O_CLOEXEC | O_NOCTTY);
            if (fd >= 0) return fd;
        }
        if (waited >= 2000 || (waited == 0 && !virtio_console_present())) return -1;
        sleep_ms(10);
    }
}

/* ---- guest setup (protocol mode) ---------------------------------------------------- */

static const char *volume_paths[MAX_VOLUMES];
static size_t nmounted;

/* volume=DEVICE:ro|rw:PATH */
static void mount_volume(size_t n, char *spec) {
    char *mode = strchr(spec, ':');
    char *path = mode ? strchr(mode + 1, ':') : NULL;
    errno = 0;
    if (!path) fatal("config: bad volume '%s' (want DEVICE:ro|rw:PATH)", spec);
    *mode++ = 0;
    *path++ = 0;
    int ro = strcmp(mode, "ro") == 0;
    if ((!ro && strcmp(mode, "rw") != 0) || path[0] != '/' || spec[0] != '/')
        fatal("config: bad volume '%s:%s:%s'", spec, mode, path);
    wait_for(spec, 5000, "volume device");
    char mnt[64], data[96];
    snprintf(mnt, sizeof mnt, VOLUMES_DIR "/%zu", n);
    snprintf(data, sizeof data, "%s/data", mnt);
    unsigned long flags = MS_NOSUID | MS_NODEV | (ro ? MS_RDONLY : 0);
    mkdir_p(mnt, 0755);
    if (mount(spec, mnt, "ext4", flags, NULL) != 0) fatal("mount volume %s on %s", spec, mnt);
    if (mkdir(data, 0755) != 0 && errno != EEXIST) fatal("mkdir %s on volume %s", data, spec);
    mkdir_p(path, 0755);
    if (mount(data, path, NULL, MS_BIND, NULL) != 0) fatal("bind %s onto %s", data, path);
    if (mount(NULL, path, NULL, MS_REMOUNT | MS_BIND | flags, NULL) != 0)
        fatal("remount %s nosuid,nodev%s", path, ro ? ",ro" : "");
    volume_paths[nmounted++] = path;
}

static void unmount_volumes(void) {
    while (nmounted > 0) {
        size_t n = --nmounted;
        char mnt[64];
        snprintf(mnt, sizeof mnt, VOLUMES_DIR "/%zu", n);
        if (umount2(volume_paths[n], 0) != 0)
            say("umount %s: %s", volume_paths[n], strerror(errno));
        if (umount2(mnt, 0) != 0) say("umount %s: %s", mnt, strerror(errno));
    }
}

static void if_up(int sock, const char *name) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", name);
    if (ioctl(sock, SIOCGIFFLAGS, &ifr) != 0) fatal("get flags of %s", name);
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(sock, SIOCSIFFLAGS, &ifr) != 0) fatal("bring %s up", name);
}

/* "ADDR/LEN" -> addr, prefix length. */
static void parse_cidr(const char *key, const char *s, int family, void *addr, unsigned *plen) {
    char buf[128];
    unsigned long n;
    snprintf(buf, sizeof buf, "%s", s);
    char *slash = strchr(buf, '/');
    unsigned max = family == AF_INET ? 32 : 128;
    errno = 0;
    if (!slash || (*slash++ = 0, parse_ulong(slash, max, &n) != 0) ||
        inet_pton(family, buf, addr) != 1)
        fatal("config: bad %s '%s' (want ADDRESS/PREFIXLEN)", key, s);
    *plen = (unsigned)n;
}

static void parse_addr(const char *key, const char *s, int family, void *addr) {
    errno = 0;
    if (inet_pton(family, s, addr) != 1) fatal("config: bad %s '%s'", key, s);
}

static void set_ipv4(int sock, const char *cidr, const char *gw) {
    struct sockaddr_in sin = {.sin_family = AF_INET};
    unsigned plen;
    parse_cidr("ip4", cidr, AF_INET, &sin.sin_addr, &plen);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "eth0");
    memcpy(&ifr.ifr_addr, &sin, sizeof sin);
    if (ioctl(sock, SIOCSIFADDR, &ifr) != 0) fatal("set eth0 address %s", cidr);
    sin.sin_addr.s_addr = htonl(plen ? 0xffffffffu << (32 - plen) : 0);
    memcpy(&ifr.ifr_netmask, &sin, sizeof sin);
    if (ioctl(sock, SIOCSIFNETMASK, &ifr) != 0) fatal("set eth0 netmask /%u", plen);
    if (!gw) return;
    struct rtentry rt;
    memset(&rt, 0, sizeof rt);
    struct sockaddr_in any = {.sin_family = AF_INET}, via = {.sin_family = AF_INET};
    parse_addr("gw4", gw, AF_INET, &via.sin_addr);
    memcpy(&rt.rt_dst, &any, sizeof any);
    memcpy(&rt.rt_genmask, &any, sizeof any);
    memcpy(&rt.rt_gateway, &via, sizeof via);
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    rt.rt_dev = (char *)"eth0";
    if (ioctl(sock, SIOCADDRT, &rt) != 0) fatal("add default route via %s", gw);
}

struct in6_ifreq_ { /* <linux/ipv6.h>'s in6_ifreq, which clashes with glibc's headers */
    struct in6_addr addr;
    uint32_t prefixlen;
    int ifindex;
};

static void set_ipv6(const char *cidr, const char *gw) {
    int sock = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0) fatal("socket(AF_INET6)");
    int ifindex = (int)if_nametoindex("eth0");
    struct in6_ifreq_ req = {.ifindex = ifindex};
    unsigned plen;
    parse_cidr("ip6", cidr, AF_INET6, &req.addr, &plen);
    req.prefixlen = plen;
    if (ioctl(sock, SIOCSIFADDR, &req) != 0) fatal("set eth0 address %s", cidr);
    if (gw) {
        struct in6_rtmsg rt;
        memset(&rt, 0, sizeof rt);
        parse_addr("gw6", gw, AF_INET6, &rt.rtmsg_gateway);
        rt.rtmsg_flags = RTF_UP | RTF_GATEWAY;
        rt.rtmsg_metric = 1;
        rt.rtmsg_ifindex = ifindex;
        if (ioctl(sock, SIOCADDRT, &rt) != 0) fatal("add default route via %s", gw);
    }
    close(sock);
}

static void setup_network(const struct config *c) {
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0) fatal("socket(AF_INET)");
    if_up(sock, "lo");
    if (c->ip4 || c->ip6) {
        errno = 0;
        if ((c->gw4 && !c->ip4) || (c->gw6 && !c->ip6))
            fatal("config: a gateway without an address");
        wait_for("/sys/class/net/eth0", 2000, "network device");
        if (c->ip6) {
            /* the host allocates addresses: no duplicate address detection, usable at once */
            if (write_text_file("/proc/sys/net/ipv6/conf/eth0/accept_dad", "0") != 0 ||
                write_text_file("/proc/sys/net/ipv6/conf/eth0/dad_transmits", "0") != 0)
                fatal("turn off IPv6 DAD on eth0");
        }
        if (c->ip4) set_ipv4(sock, c->ip4, NULL);
        if_up(sock, "eth0");
        if (c->ip4 && c->gw4) set_ipv4(sock, c->ip4, c->gw4);
        if (c->ip6) set_ipv6(c->ip6, c->gw6);
    }
    close(sock);
}

static void write_secrets(const char *json, uid_t uid, gid_t gid) {
    mkdir_p("/run/cove", 0755);
    if (mount("tmpfs", "/run/cove", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755") != 0)
        fatal("mount tmpfs on /run/cove");
    const char *path = "/run/cove/secrets.json";
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0400);
    if (fd < 0) fatal("create %s", path);
    if (write_all(fd, json, strlen(json)) != 0) fatal("write %s", path);
    if (fchown(fd, uid, gid) != 0) fatal("chown %s", path);
    if (fchmod(fd, 0400) != 0) fatal("chmod %s", path);
    if (close(fd) != 0) fatal("close %s", path);
}

static void setup_pids_limit(unsigned long pids_max) {
    char value[32];
    mkdir_p("/sys/fs/cgroup", 0755);
    if (mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0)
        fatal("mount cgroup2 on /sys/fs/cgroup");
    if (write_text_file("/sys/fs/cgroup/cgroup.subtree_control", "+pids") != 0)
        fatal("enable the pids controller");
    if (mkdir(APP_CGROUP, 0755) != 0 && errno != EEXIST) fatal("mkdir %s", APP_CGROUP);
    snprintf(value, sizeof value, "%lu", pids_max);
    if (write_text_file(APP_CGROUP "/pids.max", value) != 0) fatal("write pids.max");
    app_cgroup_ready = 1;
}

/* ---- sessions: the command (channel 0) and the execs -------------------------------- */

struct session {
    int used;
    uint32_t ch;
    pid_t pid;
    int reaped, status;
    int tty;
    int in_fd, out_fd, err_fd; /* -1 when closed; a tty's are all the master */
    char *inbuf;
    size_t inlen;
    int close_in; /* close stdin once inbuf is written */
    unsigned long oom0;
    long long eof_deadline; /* after the reap: stop waiting for output EOF then */
};

static struct session sessions[MAX_SESSIONS];
static struct config cfg;
static struct spec exec_spec;
static const char *root_dev, *root_fstype;
static long long stop_deadline = -1, config_deadline = -1;
static int have_config, port_reading = 1;
static long long port_paused_until;

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static unsigned long oom_kills(void) {
    char *vm = read_file("/proc/vmstat", 64 * 1024, NULL);
    unsigned long n = 0;
    const char *p = vm ? strstr(vm, "\noom_kill ") : NULL;
    if (p) n = strtoul(p + 10, NULL, 10);
    free(vm);
    return n;
}

static struct session *find_session(uint32_t ch) {
    for (int i = 0; i < MAX_SESSIONS; i++)
        if (sessions[i].used && sessions[i].ch == ch) return &sessions[i];
    return NULL;
}

static struct session *new_session(uint32_t ch) {
    int from = ch == 0 ? 0 : 1, to = ch == 0 ? 1 : MAX_SESSIONS;
    for (int i = from; i < to; i++) {
        if (sessions[i].used) continue;
        struct session *s = &sessions[i];
        memset(s, 0, sizeof *s);
        s->used = 1;
        s->ch = ch;
        s->in_fd = s->out_fd = s->err_fd = -1;
        s->eof_deadline = -1;
        s->oom0 = oom_kills();
        return s;
    }
    return NULL;
}

static void close_stdin(struct session *s) {
    if (!s->tty) close_fd(&s->in_fd);
    free(s->inbuf);
    s->inbuf = NULL;
    s->inlen = 0;
}

static void close_output(struct session *s, int *fd) {
    if (s->tty) {
        close_fd(&s->out_fd);
        s->in_fd = s->err_fd = -1;
        close_stdin(s);
    } else {
        close_fd(fd);
    }
}

static void shutdown_vm(void) __attribute__((noreturn));
static void shutdown_vm(void) {
    kill(-1, SIGKILL);
    while (waitpid(-1, NULL, 0) > 0 || errno == EINTR) {
    }
    sync();
    unmount_volumes();
    power_off();
}

static void send_exit(struct session *s) {
    const char *oom = oom_kills() > s->oom0 ? " oom" : "";
    if (WIFSIGNALED(s->status))
        send_text(F_EXIT, s->ch, "signal %d%s", WTERMSIG(s->status), oom);
    else
        send_text(F_EXIT, s->ch, "exit %d%s", WEXITSTATUS(s->status), oom);
}

/* EXIT once the process was reaped and its output is drained (or the grace period ran out). */
static void maybe_finish(struct session *s, int force) {
    if (!s->reaped || (!force && (s->out_fd >= 0 || s->err_fd >= 0))) return;
    close_output(s, &s->out_fd);
    close_output(s, &s->err_fd);
    send_exit(s);
    if (s->ch == 0) shutdown_vm();
    close_stdin(s);
    close_fd(&s->in_fd);
    s->used = 0;
}

/* A fatal error once the command runs: kill everything, report the command's end, power off. */
static void fatal_after_start(void) {
    struct session *s = &sessions[0];
    kill(-1, SIGKILL);
    if (s->used && !s->reaped && waitpid(s->pid, &s->status, 0) == s->pid) s->reaped = 1;
    if (s->used && s->reaped) send_exit(s);
    shutdown_vm();
}

static void reap(void) {
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        for (int i = 0; i < MAX_SESSIONS; i++) {
            struct session *s = &sessions[i];
            if (!s->used || s->pid != pid || s->reaped) continue;
            s->reaped = 1;
            s->status = st;
            s->eof_deadline = now_ms() + EOF_GRACE_MS;
            maybe_finish(s, 0);
        }
    }
}

static void read_output(struct session *s, int *fd, int type) {
    static char buf[MAX_DATA];
    ssize_t r = read(*fd, buf, sizeof buf);
    if (r > 0) {
        send_frame(s->tty ? F_STDOUT : type, s->ch, buf, (size_t)r);
        return;
    }
    if (r < 0 && (errno == EINTR || errno == EAGAIN)) return;
    if (r < 0 && errno != EIO) say("read output of channel %u: %s", s->ch, strerror(errno));
    close_output(s, fd); /* EOF; a pty master says EIO once every slave fd is closed */
    maybe_finish(s, 0);
}

static void write_stdin(struct session *s) {
    while (s->inlen > 0 && s->in_fd >= 0) {
        ssize_t w = write(s->in_fd, s->inbuf, s->inlen);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) return;
            close_stdin(s); /* EPIPE, EIO: nobody reads it any more */
            return;
        }
        memmove(s->inbuf, s->inbuf + w, s->inlen - (size_t)w);
        s->inlen -= (size_t)w;
    }
    if (s->close_in && s->inlen == 0) close_stdin(s);
}

/* ---- frames from the host ----------------------------------------------------------- */

static int parse_signal(const char *s, int *sig) {
    static const struct {
        const char *name;
        int sig;
    } names[] = {{"HUP", SIGHUP},   {"INT", SIGINT},   {"QUIT", SIGQUIT}, {"KILL", SIGKILL},
                 {"USR1", SIGUSR1}, {"USR2", SIGUSR2}, {"TERM", SIGTERM}, {"ALRM", SIGALRM},
                 {"CONT", SIGCONT}, {"STOP", SIGSTOP}, {"TSTP", SIGTSTP}, {"WINCH", SIGWINCH}};
    unsigned long n;
    if (parse_ulong(s, 64, &n) == 0 && n > 0) {
        *sig = (int)n;
        return 0;
    }
    if (strncmp(s, "SIG", 3) == 0) s += 3;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (strcmp(s, names[i].name) == 0) {
            *sig = names[i].sig;
            return 0;
        }
    }
    return -1;
}

static char *payload_copy(const char *p, size_t len) {
    char *c = malloc(len + 1);
    if (!c) fatal("out of memory");
    memcpy(c, p, len);
    c[len] = 0;
    return c;
}

static void start_instance(const char *payload, size_t len) {
    char *buf = payload_copy(payload, len); /* the config points into it: kept forever */
    char err[256];
    if (parse_records(buf, len, REC_CONFIG, &cfg, &cfg.run, err, sizeof err) != 0) {
        errno = 0;
        fatal("%s", err);
    }
    have_config = 1;
    switch_root(root_dev, root_fstype);
    if (cfg.hostname && sethostname(cfg.hostname, strlen(cfg.hostname)) != 0)
        fatal("sethostname %s", cfg.hostname);
    for (size_t i = 0; i < cfg.nvolumes; i++) mount_volume(i, cfg.volumes[i]);
    setup_network(&cfg);
    if (cfg.secrets) write_secrets(cfg.secrets, cfg.run.uid, cfg.run.gid);
    if (cfg.pids_max) setup_pids_limit(cfg.pids_max);
    if (cfg.run.workdir[0] == '/' && access(cfg.run.workdir, F_OK) != 0)
        mkdir_p(cfg.run.workdir, 0755);

    struct session *s = new_session(0);
    int fds[3], failed;
    char msg[1024];
    pid_t pid = spawn(&cfg.run, IO_PIPES_NO_STDIN, fds, &failed, msg, sizeof msg);
    if (pid < 0) {
        errno = 0;
        fatal("%s", msg);
    }
    command_started = 1;
    s->pid = pid;
    s->out_fd = fds[1];
    s->err_fd = fds[2];
    if (failed) {
        say("fatal: %s", msg);
        send_frame(F_FATAL, 0, msg, strlen(msg));
    } else {
        send_text(F_STARTED, 0, "%d", (int)pid);
    }
}

static void start_exec(uint32_t ch, const char *payload, size_t len) {
    if (ch == 0 || find_session(ch)) {
        say("EXEC on channel %u: channel in use, dropped", ch);
        return;
    }
    char *buf = payload_copy(payload, len);
    char msg[1024];
    struct session *s = new_session(ch);
    if (!s) {
        snprintf(msg, sizeof msg, "too many exec sessions (at most %d)", MAX_SESSIONS - 1);
    } else if (parse_records(buf, len, REC_EXEC, NULL, &exec_spec, msg, sizeof msg) == 0) {
        int fds[3], failed;
        pid_t pid = spawn(&exec_spec, exec_spec.tty ? IO_TTY : IO_PIPES, fds, &failed, msg,
                          sizeof msg);
        if (pid > 0) {
            free(buf);
            s->pid = pid;
            s->tty = exec_spec.tty;
            s->in_fd = fds[0];
            s->out_fd = fds[1];
            s->err_fd = s->tty ? -1 : fds[2];
            if (failed) {
                send_frame(F_FATAL, ch, msg, strlen(msg));
                close_stdin(s);
            } else {
                send_text(F_EXEC_STARTED, ch, "%d", (int)pid);
            }
            return;
        }
    }
    /* nothing started: FATAL + EXIT 125 at once */
    free(buf);
    send_frame(F_FATAL, ch, msg, strlen(msg));
    send_text(F_EXIT, ch, "exit 125");
    if (s) s->used = 0;
}

static void on_stdin(struct session *s, const char *data, size_t len) {
    if (len == 0) {
        if (!s->tty) s->close_in = 1;
        if (s->inlen == 0) write_stdin(s);
        return;
    }
    if (s->in_fd < 0 || s->close_in) return;
    if (s->inlen + len > MAX_STDIN_BUF) {
        say("channel %u: stdin buffer full (%d bytes), %zu bytes dropped", s->ch,
            MAX_STDIN_BUF, len);
        return;
    }
    char *nb = realloc(s->inbuf, s->inlen + len);
    if (!nb) {
        say("channel %u: out of memory for stdin, %zu bytes dropped", s->ch, len);
        return;
    }
    s->inbuf = nb;
    memcpy(s->inbuf + s->inlen, data, len);
    s->inlen += len;
    write_stdin(s);
}

static void on_stop(const char *text) {
    char sigbuf[32];
    long long ms;
    int sig;
    if (sscanf(text, "%31s %lld", sigbuf, &ms) != 2 || ms < 0 || parse_signal(sigbuf, &sig)) {
        say("bad STOP '%.60s', dropped", text);
        return;
    }
    struct session *s = &sessions[0];
    if (sig == SIGKILL) {
        kill(-1, SIGKILL);
        return;
    }
    if (s->used && !s->reaped) kill(-s->pid, sig);
    long long at = now_ms() + ms;
    if (stop_deadline < 0 || at < stop_deadline) stop_deadline = at;
}

static void on_frame(int type, uint32_t ch, const char *p, size_t len) {
    if (type == F_CONFIG) {
        if (have_config || ch != 0)
            say("unexpected CONFIG on channel %u, dropped", ch);
        else
            start_instance(p, len);
        return;
    }
    if (type != F_STOP && type != F_EXEC && type != F_STDIN && type != F_RESIZE &&
        type != F_SIGNAL) {
        say("unknown frame type 0x%02x on channel %u, ignored", type, ch);
        return;
    }
    if (!have_config) {
        say("frame type 0x%02x before CONFIG, dropped", type);
        return;
    }
    if (type == F_EXEC) {
        start_exec(ch, p, len);
        return;
    }
    char text[64];
    snprintf(text, sizeof text, "%.*s", (int)(len < 63 ? len : 63), p);
    if (type == F_STOP) {
        if (ch == 0) on_stop(text);
        return;
    }
    struct session *s = ch ? find_session(ch) : NULL;
    if (!s) return; /* an unknown or finished channel */
    if (type == F_STDIN) {
        on_stdin(s, p, len);
    } else if (type == F_RESIZE) {
        struct winsize ws;
        memset(&ws, 0, sizeof ws);
        if (s->tty && s->out_fd >= 0 && sscanf(text, "%hu %hu", &ws.ws_row, &ws.ws_col) == 2)
            ioctl(s->out_fd, TIOCSWINSZ, &ws);
    } else {
        int sig;
        if (parse_signal(text, &sig) == 0 && !s->reaped) kill(-s->pid, sig);
    }
}

/* Read what the port has, hand out complete frames. */
static void read_port(void) {
    static unsigned char buf[4 + MAX_FRAME];
    static size_t len;
    ssize_t r = read(port_fd, buf + len, sizeof buf - len);
    if (r < 0 && (errno == EINTR || errno == EAGAIN)) return;
    if (r <= 0) { /* the host is not connected (or went away): look again shortly */
        if (r < 0) say("read " PORT_NAME ": %s", strerror(errno));
        port_paused_until = now_ms() + 100;
        return;
    }
    len += (size_t)r;
    size_t off = 0;
    while (len - off >= 9) {
        uint32_t flen = get_be32(buf + off);
        if (flen < 5 || flen > MAX_FRAME) {
            say("bad frame length %u on " PORT_NAME ": no longer reading it", flen);
            port_reading = 0;
            if (!have_config) {
                errno = 0;
                fatal("bad frame on " PORT_NAME " before CONFIG");
            }
            return;
        }
        if (len - off < 4 + (size_t)flen) break;
        on_frame(buf[off + 4], get_be32(buf + off + 5), (const char *)buf + off + 9, flen - 5);
        off += 4 + (size_t)flen;
    }
    memmove(buf, buf + off, len - off);
    len -= off;
}

/* ---- the main loop (protocol mode) -------------------------------------------------- */

static void on_signals(int sfd) {
    struct signalfd_siginfo si;
    while (read(sfd, &si, sizeof si) == (ssize_t)sizeof si) {
        int sig = (int)si.ssi_signo;
        struct session *s = &sessions[0];
        if (sig == SIGCHLD)
            reap();
        else if (s->used && !s->reaped)
            kill(-s->pid, sig == SIGINT ? SIGTERM : sig);
    }
    reap(); /* signalfd coalesces: reap whatever is there */
}

static void on_timer(int tfd) {
    uint64_t ticks;
    if (read(tfd, &ticks, sizeof ticks) == (ssize_t)sizeof ticks) send_frame(F_PING, 0, "", 0);
}

static void on_deadlines(long long now) {
    if (config_deadline >= 0 && !have_config && now >= config_deadline) {
        errno = 0;
        fatal("no CONFIG on " PORT_NAME " within %d s", CONFIG_WAIT_MS / 1000);
    }
    if (stop_deadline >= 0 && now >= stop_deadline) {
        stop_deadline = -1;
        kill(-1, SIGKILL);
    }
    for (int i = 0; i < MAX_SESSIONS; i++) {
        struct session *s = &sessions[i];
        if (s->used && s->reaped && s->eof_deadline >= 0 && now >= s->eof_deadline)
            maybe_finish(s, 1);
    }
}

static int poll_timeout(long long now) {
    long long next = -1;
    long long cands[2] = {have_config ? -1 : config_deadline, stop_deadline};
    for (int i = 0; i < 2; i++)
        if (cands[i] >= 0 && (next < 0 || cands[i] < next)) next = cands[i];
    for (int i = 0; i < MAX_SESSIONS; i++) {
        long long d = sessions[i].used && sessions[i].reaped ? sessions[i].eof_deadline : -1;
        if (d >= 0 && (next < 0 || d < next)) next = d;
    }
    if (port_paused_until > now && (next < 0 || port_paused_until < next))
        next = port_paused_until;
    if (next < 0) return -1;
    return next <= now ? 0 : (int)(next - now);
}

enum { T_PORT, T_SIG, T_TIMER, T_OUT, T_ERR, T_IN };

static void event_loop(int sfd, int tfd) __attribute__((noreturn));
static void event_loop(int sfd, int tfd) {
    struct pollfd pfd[3 + 3 * MAX_SESSIONS];
    int tag[3 + 3 * MAX_SESSIONS], who[3 + 3 * MAX_SESSIONS];
    for (;;) {
        long long now = now_ms();
        int n = 0;
#define ADD(fd_, ev_, t_, w_) \
    (pfd[n] = (struct pollfd){.fd = (fd_), .events = (ev_)}, tag[n] = (t_), who[n++] = (w_))
        if (port_reading && port_paused_until <= now) ADD(port_fd, POLLIN, T_PORT, 0);
        ADD(sfd, POLLIN, T_SIG, 0);
        ADD(tfd, POLLIN, T_TIMER, 0);
        for (int i = 0; i < MAX_SESSIONS; i++) {
            struct session *s = &sessions[i];
            if (!s->used) continue;
            if (s->out_fd >= 0) ADD(s->out_fd, POLLIN, T_OUT, i);
            if (s->err_fd >= 0) ADD(s->err_fd, POLLIN, T_ERR, i);
            if (s->in_fd >= 0 && s->inlen > 0) ADD(s->in_fd, POLLOUT, T_IN, i);
        }
#undef ADD
        int r = poll(pfd, (nfds_t)n, poll_timeout(now));
        if (r < 0 && errno != EINTR) fatal("poll");
        for (int k = 0; r > 0 && k < n; k++) {
            short ev = pfd[k].revents;
            if (!ev) continue;
            struct session *s = &sessions[who[k]];
            switch (tag[k]) {
            case T_PORT:
                if (ev & POLLIN)
                    read_port();
                else /* POLLHUP: the host is not connected; POLLERR, POLLNVAL */
                    port_paused_until = now_ms() + 100;
                break;
            case T_SIG: on_signals(sfd); break;
            case T_TIMER: on_timer(tfd); break;
            case T_OUT:
                if (s->used && s->out_fd == pfd[k].fd) read_output(s, &s->out_fd, F_STDOUT);
                break;
            case T_ERR:
                if (s->used && s->err_fd == pfd[k].fd) read_output(s, &s->err_fd, F_STDERR);
                break;
            case T_IN:
                if (s->used && s->in_fd == pfd[k].fd) write_stdin(s);
                break;
            }
        }
        on_deadlines(now_ms());
    }
}

static void protocol_mode(void) __attribute__((noreturn));
static void protocol_mode(void) {
    reboot(RB_DISABLE_CAD); /* Ctrl-Alt-Del becomes SIGINT to us */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    if (sigprocmask(SIG_BLOCK, &set, NULL) != 0) fatal("sigprocmask");
    int sfd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0) fatal("signalfd");
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    struct itimerspec its = {.it_interval = {1, 0}, .it_value = {1, 0}};
    if (tfd < 0 || timerfd_settime(tfd, 0, &its, NULL) != 0) fatal("timerfd");
    send_text(F_HELLO, 0, "cove-init 1");
    config_deadline = now_ms() + CONFIG_WAIT_MS;
    event_loop(sfd, tfd);
}

int main(void) {
    if (getpid() != 1) {
        fprintf(stderr, "cove-init: must run as PID 1\n");
        return 2;
    }
    umask(022);
    must_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    open_console();
    must_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    must_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);

    size_t clen;
    char *cmdline = read_file("/proc/cmdline", 4096, &clen);
    if (!cmdline) fatal("read /proc/cmdline");
    root_dev = cmdline_param(cmdline, "root", DEFAULT_ROOT);
    root_fstype = cmdline_param(cmdline, "rootfstype", "ext4");
    const char *config_path = cmdline_param(cmdline, "config", DEFAULT_CONFIG);

    load_modules();
    port_fd = open_port();
    if (port_fd < 0) file_mode(config_path, root_dev, root_fstype);
    protocol_mode();
}
