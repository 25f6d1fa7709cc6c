/*
 * cove-init: PID 1 inside a cove microVM.
 *
 * Runs from the initramfs: mounts /dev /proc /sys, loads the kernel modules listed in
 * /modules/order (finit_module, in order), mounts the root ext4 disk, moves /dev /proc /sys
 * into it and chroots there, reads the command config the host wrote into the root disk,
 * runs that command with its stdout/stderr on the console, reaps every zombie, forwards
 * SIGTERM/SIGINT to the command, and when the command exits prints one machine-readable line
 *
 *     cove-init: exit N        (the command exited with status N)
 *     cove-init: signal N      (the command was killed by signal N)
 *
 * then syncs and powers the VM off. Any setup failure prints
 *
 *     cove-init: fatal: <what>: <strerror>
 *
 * and powers off too. See README.md for the kernel command line and the config format.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NEWROOT "/newroot"
#define DEFAULT_ROOT "/dev/vda"
#define DEFAULT_CONFIG "/.cove/config"
#define MAX_CONFIG (1024 * 1024)
#define MAX_ENTRIES 4096

extern char **environ;

static int console_fd = 2;

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

static void fatal(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void fatal(const char *fmt, ...) {
    char what[768];
    int err = errno;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (err)
        say("fatal: %s: %s", what, strerror(err));
    else
        say("fatal: %s", what);
    power_off();
}

/* Make fds 0, 1, 2 the console (stdin /dev/null if asked). */
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
    char buf[512];
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

static void wait_for(const char *path, int timeout_ms) {
    struct timespec ts = {0, 10 * 1000 * 1000};
    for (int waited = 0; waited < timeout_ms; waited += 10) {
        if (access(path, F_OK) == 0) return;
        nanosleep(&ts, NULL);
    }
    errno = ENOENT;
    fatal("root device %s did not appear", path);
}

static void move_into(const char *from, const char *to) {
    mkdir_p(to, 0755);
    if (mount(from, to, NULL, MS_MOVE, NULL) != 0) fatal("move %s to %s", from, to);
}

static void switch_root(const char *root_dev, const char *fstype) {
    wait_for(root_dev, 5000);
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

struct config {
    char *argv[MAX_ENTRIES + 1];
    char *envp[MAX_ENTRIES + 1];
    const char *workdir;
    const char *hostname;
    uid_t uid;
    gid_t gid;
};

static unsigned long parse_id(const char *s, const char *what) {
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || !*s || *end || v > 0xfffffffeUL) {
        errno = 0;
        fatal("config: bad %s '%s'", what, s);
    }
    return v;
}

/* The config: NUL-terminated "key=value" records; see README.md. */
static void read_config(const char *path, struct config *c) {
    size_t len;
    char *buf = read_file(path, MAX_CONFIG, &len);
    if (!buf) fatal("read config %s", path);
    memset(c, 0, sizeof *c);
    c->workdir = "/";
    size_t na = 0, ne = 0;
    int version_seen = 0;
    for (char *p = buf, *next; p < buf + len; p = next) {
        next = p + strlen(p) + 1;
        char *eq = strchr(p, '=');
        if (!eq) {
            errno = 0;
            fatal("config: record without '=': '%.40s'", p);
        }
        *eq = 0;
        char *v = eq + 1;
        if (strcmp(p, "version") == 0) {
            if (strcmp(v, "1") != 0) {
                errno = 0;
                fatal("config: unsupported version %s", v);
            }
            version_seen = 1;
        } else if (strcmp(p, "arg") == 0) {
            if (na >= MAX_ENTRIES) {
                errno = 0;
                fatal("config: more than %d args", MAX_ENTRIES);
            }
            c->argv[na++] = v;
        } else if (strcmp(p, "env") == 0) {
            if (ne >= MAX_ENTRIES) {
                errno = 0;
                fatal("config: more than %d env entries", MAX_ENTRIES);
            }
            c->envp[ne++] = v;
        } else if (strcmp(p, "workdir") == 0) {
            c->workdir = v;
        } else if (strcmp(p, "hostname") == 0) {
            c->hostname = v;
        } else if (strcmp(p, "uid") == 0) {
            c->uid = (uid_t)parse_id(v, "uid");
        } else if (strcmp(p, "gid") == 0) {
            c->gid = (gid_t)parse_id(v, "gid");
        } else {
            errno = 0;
            fatal("config: unknown key '%s'", p);
        }
    }
    errno = 0;
    if (!version_seen) fatal("config: no version record");
    if (na == 0) fatal("config: no command (no arg records)");
}

static volatile sig_atomic_t pending_signal;

static void on_signal(int sig) { pending_signal = sig; }

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
    const char *root_dev = cmdline_param(cmdline, "root", DEFAULT_ROOT);
    const char *fstype = cmdline_param(cmdline, "rootfstype", "ext4");
    const char *config_path = cmdline_param(cmdline, "config", DEFAULT_CONFIG);

    load_modules();
    switch_root(root_dev, fstype);

    struct config cfg;
    read_config(config_path, &cfg);
    if (cfg.hostname && sethostname(cfg.hostname, strlen(cfg.hostname)) != 0)
        fatal("sethostname %s", cfg.hostname);

    /* Ctrl-Alt-Del becomes SIGINT to us (a graceful-stop hook); forward TERM/INT/HUP. */
    reboot(RB_DISABLE_CAD);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);

    /* exec failure is reported through a close-on-exec pipe */
    int errpipe[2];
    if (pipe2(errpipe, O_CLOEXEC) != 0) fatal("pipe");

    pid_t child = fork();
    if (child < 0) fatal("fork");
    if (child == 0) {
        close(errpipe[0]);
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(SIGTERM, &dfl, NULL);
        sigaction(SIGINT, &dfl, NULL);
        sigaction(SIGHUP, &dfl, NULL);
        setsid();
        int step = 0;
        if (chdir(cfg.workdir) != 0) step = 1;
        else if (setgroups(0, NULL) != 0) step = 2;
        else if (setgid(cfg.gid) != 0) step = 3;
        else if (setuid(cfg.uid) != 0) step = 4;
        if (step == 0) {
            environ = cfg.envp; /* execvp looks PATH up in the new environment */
            execvp(cfg.argv[0], cfg.argv);
            step = 5;
        }
        int report[2] = {step, errno};
        ssize_t w = write(errpipe[1], report, sizeof report);
        (void)w;
        _exit(step == 5 ? (errno == ENOENT ? 127 : 126) : 125);
    }
    close(errpipe[1]);
    int report[2];
    ssize_t r;
    do r = read(errpipe[0], report, sizeof report);
    while (r < 0 && errno == EINTR);
    close(errpipe[0]);
    if (r == (ssize_t)sizeof report) {
        static const char *steps[] = {"", "chdir to workdir", "setgroups", "setgid", "setuid",
                                      "exec"};
        const char *what = steps[report[0] >= 1 && report[0] <= 5 ? report[0] : 5];
        if (report[0] == 1)
            say("fatal: %s %s: %s", what, cfg.workdir, strerror(report[1]));
        else if (report[0] == 5)
            say("fatal: %s %s: %s", what, cfg.argv[0], strerror(report[1]));
        else
            say("fatal: %s %u:%u: %s", what, (unsigned)cfg.uid, (unsigned)cfg.gid,
                strerror(report[1]));
    }

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
