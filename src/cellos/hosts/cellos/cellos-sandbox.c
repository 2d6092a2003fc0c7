/*
 * cellos-sandbox: enter a CellOS cell and exec its workload.
 *
 * One small launcher instead of bubblewrap + a cgroup-joining shell + env(1): the cell's
 * startup is on the critical path of every cell, and doing the work in one process (join the
 * cgroup leaves, enter namespaces, build the root, drop privileges, exec) costs about what
 * unshare(1) costs. It also lets Landlock be applied *after* the mounts, which bubblewrap
 * cannot do.
 *
 *   cellos-sandbox [options] -- PROGRAM [ARG...]
 *
 *   --cgroup FILE          write our pid to FILE (a leaf's cgroup.procs) before anything else
 *   --netns PATH           join this network namespace (else a new, empty one)
 *   --userns               new user namespace mapping the caller's uid and gid
 *   --hostname NAME
 *   --rootfs DIR           bind DIR read-only as the root (else a tmpfs root)
 *   --symlink TARGET PATH  (repeatable) a symlink in the root
 *   --ro-bind SRC DST      (repeatable) read-only, recursive bind of a host path
 *   --tmp-size BYTES       size of the private /tmp
 *   --workspace SRC DST    read-write bind; the workload's working directory
 *   --seccomp FD           a BPF program (struct sock_filter[]) loaded last
 *   --landlock             apply the Landlock rules (fail if the kernel has no Landlock)
 *   --parent PID           the supervisor's pid: if it is already gone, do nothing
 *   --user UID GID         run the workload as this (non-zero) uid and gid, no supplementary
 *                          groups (a root supervisor's cells: root-owned host files stay shut)
 *   --error-fd FD          setup and exec errors are written here, then exit 125 (setup) or
 *                          127 (exec); the descriptor is close-on-exec, so the supervisor
 *                          reads end-of-file and nothing else when the workload started
 *   --secrets FD           a sealed memfd of secrets (repeated: KEY NUL, 8-byte big-endian
 *                          length, VALUE): each becomes /run/secrets/KEY (mode 0400, owned by
 *                          the workload) on a tmpfs of the cell's own; values never touch argv,
 *                          the environment or a host file
 *   --secret-lease SECONDS the cell's pid 1 truncates and removes the secret files this long
 *                          after the workload started (runtimeLeasedBroker)
 *
 * Process shape (the supervisor's CellControl relies on it): this process (the supervisor's
 * child) stays outside the cell's pid namespace and waits; its child is the cell's pid 1, which
 * reaps orphans; the workload is pid 2, in its own session. When pid 2 exits, pid 1 exits with
 * its status (128+N for signal N) and the kernel kills whatever else is left in the namespace.
 * Every process of the cell dies with the supervisor (PR_SET_PDEATHSIG).
 *
 * The workload's environment is exactly this process's environment: the supervisor starts it
 * with the declared set, and nothing here adds to it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <grp.h>
#include <poll.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define SETUP_FAILED 125
#define MAX_SECRETS 64
#define MAX_SECRET_KEY 128
#define MAX_SECRET_BYTES (1 << 20)
#define SECRETS_DIR "/run/secrets"
#define EXEC_FAILED 127
#define MAX_ITEMS 64

/* Kernel ABI values, spelled out so that the launcher builds against older headers. */
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
#ifndef SYS_landlock_create_ruleset
#define SYS_landlock_create_ruleset 444
#define SYS_landlock_add_rule 445
#define SYS_landlock_restrict_self 446
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#define ATTR_RDONLY 0x1ULL
#define ATTR_NOSUID 0x2ULL
#define ATTR_NODEV 0x4ULL
#define AT_RECURSIVE_FLAG 0x8000
#define LL_CREATE_RULESET_VERSION 1U
#define LL_RULE_PATH_BENEATH 1

struct mount_attr_v0 {
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};
struct ll_ruleset_attr {
    uint64_t handled_access_fs, handled_access_net, scoped;
};
struct ll_path_beneath {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));

/* Landlock filesystem rights (ABI 1..5). */
#define LL_EXECUTE (1ULL << 0)
#define LL_WRITE_FILE (1ULL << 1)
#define LL_READ_FILE (1ULL << 2)
#define LL_READ_DIR (1ULL << 3)
#define LL_ABI1_ALL ((1ULL << 13) - 1)
#define LL_REFER (1ULL << 13)
#define LL_TRUNCATE (1ULL << 14)
#define LL_IOCTL_DEV (1ULL << 15)
#define LL_SCOPE_ABSTRACT_UNIX_SOCKET (1ULL << 0)
#define LL_SCOPE_SIGNAL (1ULL << 1)

struct pair {
    const char *a, *b;
};

static struct {
    const char *cgroups[8];
    int n_cgroups;
    const char *netns, *hostname, *rootfs;
    int userns, landlock;
    struct pair symlinks[MAX_ITEMS];
    int n_symlinks;
    struct pair ro_binds[MAX_ITEMS];
    int n_ro_binds;
    const char *tmp_size;
    struct pair workspace;
    int seccomp_fd, error_fd, secrets_fd;
    long uid, gid, parent, secret_lease;
    char **argv;
} opt = {.seccomp_fd = -1, .error_fd = -1, .secrets_fd = -1, .uid = -1, .gid = -1, .parent = -1};

/* The secret files pid 1 removes when the lease ends (their descriptors stay open in pid 1
 * only, which is not dumpable: the workload cannot reach them through /proc/1/fd). */
static struct {
    char key[MAX_SECRET_KEY + 1];
    int fd;
} secrets[MAX_SECRETS];
static int n_secrets;
static volatile sig_atomic_t lease_over;

static struct sock_fprog seccomp_prog;

/* Report to the supervisor (error fd, else stderr) and exit. Never returns. */
static void __attribute__((noreturn, format(printf, 2, 3))) die(int code, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg - 1, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if (n > (int)sizeof msg - 2) n = sizeof msg - 2;
    msg[n++] = '\n';
    int fd = opt.error_fd >= 0 ? opt.error_fd : 2;
    ssize_t ignored = write(fd, msg, n);
    (void)ignored;
    _exit(code);
}

#define CHECK(call, ...)                                           \
    do {                                                           \
        if ((call) < 0) die(SETUP_FAILED, __VA_ARGS__);            \
    } while (0)

static void write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) die(SETUP_FAILED, "cannot open %s: %s", path, strerror(errno));
    size_t len = strlen(text);
    if (write(fd, text, len) != (ssize_t)len)
        die(SETUP_FAILED, "cannot write %s: %s", path, strerror(errno));
    close(fd);
}

static int parse_fd(const char *s) {
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < 3 || v > 65535) die(SETUP_FAILED, "bad fd %s", s);
    return (int)v;
}

static long parse_id(const char *s) {
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < 1 || v > 0x7fffffffL) die(SETUP_FAILED, "bad id %s", s);
    return v;
}

static void parse(int argc, char **argv) {
    int i = 1;
    for (; i < argc; i++) {
        const char *a = argv[i];
        int left = argc - i - 1;
#define NEED(n) \
    if (left < (n)) die(SETUP_FAILED, "%s needs %d argument(s)", a, (n))
        if (!strcmp(a, "--")) { i++; break; }
        else if (!strcmp(a, "--cgroup")) {
            NEED(1);
            if (opt.n_cgroups == 8) die(SETUP_FAILED, "too many --cgroup");
            opt.cgroups[opt.n_cgroups++] = argv[++i];
        } else if (!strcmp(a, "--netns")) { NEED(1); opt.netns = argv[++i]; }
        else if (!strcmp(a, "--hostname")) { NEED(1); opt.hostname = argv[++i]; }
        else if (!strcmp(a, "--rootfs")) { NEED(1); opt.rootfs = argv[++i]; }
        else if (!strcmp(a, "--userns")) opt.userns = 1;
        else if (!strcmp(a, "--landlock")) opt.landlock = 1;
        else if (!strcmp(a, "--symlink") || !strcmp(a, "--ro-bind")) {
            NEED(2);
            int ro = a[2] == 'r';
            struct pair *list = ro ? opt.ro_binds : opt.symlinks;
            int *n = ro ? &opt.n_ro_binds : &opt.n_symlinks;
            if (*n == MAX_ITEMS) die(SETUP_FAILED, "too many %s", a);
            list[*n].a = argv[i + 1];
            list[*n].b = argv[i + 2];
            (*n)++;
            i += 2;
        } else if (!strcmp(a, "--tmp-size")) { NEED(1); opt.tmp_size = argv[++i]; }
        else if (!strcmp(a, "--workspace")) {
            NEED(2);
            opt.workspace.a = argv[i + 1];
            opt.workspace.b = argv[i + 2];
            i += 2;
        } else if (!strcmp(a, "--seccomp")) { NEED(1); opt.seccomp_fd = parse_fd(argv[++i]); }
        else if (!strcmp(a, "--error-fd")) { NEED(1); opt.error_fd = parse_fd(argv[++i]); }
        else if (!strcmp(a, "--secrets")) { NEED(1); opt.secrets_fd = parse_fd(argv[++i]); }
        else if (!strcmp(a, "--secret-lease")) {
            NEED(1);
            opt.secret_lease = parse_id(argv[++i]);
        }
        else if (!strcmp(a, "--parent")) { NEED(1); opt.parent = parse_id(argv[++i]); }
        else if (!strcmp(a, "--user")) {
            NEED(2);
            opt.uid = parse_id(argv[i + 1]);
            opt.gid = parse_id(argv[i + 2]);
            i += 2;
        }
        else die(SETUP_FAILED, "unknown option %s", a);
#undef NEED
    }
    if (i >= argc) die(SETUP_FAILED, "no program to run");
    if (!opt.workspace.a || opt.workspace.b[0] != '/')
        die(SETUP_FAILED, "--workspace SRC /ABSOLUTE-DST is required");
    if (opt.secret_lease > 0 && opt.secrets_fd < 0)
        die(SETUP_FAILED, "--secret-lease needs --secrets");
    opt.argv = argv + i;
}

static void read_seccomp(void) {
    static struct sock_filter program[BPF_MAXINSNS + 1];
    unsigned char *buf = (unsigned char *)program;
    size_t len = 0;
    for (;;) {
        ssize_t n = read(opt.seccomp_fd, buf + len, sizeof program - len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die(SETUP_FAILED, "cannot read the seccomp program: %s", strerror(errno));
        if (n == 0) break;
        len += (size_t)n;
        if (len == sizeof program) die(SETUP_FAILED, "seccomp program too large");
    }
    close(opt.seccomp_fd);
    if (len == 0 || len % sizeof(struct sock_filter))
        die(SETUP_FAILED, "seccomp program has a bad length (%zu bytes)", len);
    seccomp_prog.len = (unsigned short)(len / sizeof(struct sock_filter));
    seccomp_prog.filter = program;
}

/* A path as the user knows it: inside the cell ("/newroot/x" -> "/x") or on the host
 * ("/oldroot/x" -> "/x"), not the launcher's staging names. */
static const char *shown(const char *path) {
    if (!strncmp(path, "/newroot/", 9) || !strncmp(path, "/oldroot/", 9)) return path + 8;
    return path;
}

/* mkdir -p for a path inside the new root (all components are created 0755). */
static void make_dirs(const char *path) {
    char buf[4096];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf)
        die(SETUP_FAILED, "path too long: %s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0755) < 0 && errno != EEXIST)
            die(SETUP_FAILED, "cannot create %s: %s", shown(buf), strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0755) < 0 && errno != EEXIST)
        die(SETUP_FAILED, "cannot create %s: %s", shown(buf), strerror(errno));
}

/* Create an empty file or directory at dst (inside the new root) to bind src onto. */
static void make_mount_point(const char *src, const char *dst) {
    struct stat st;
    if (stat(src, &st) < 0) die(SETUP_FAILED, "cannot bind %s: %s", shown(src), strerror(errno));
    if (lstat(dst, &st) == 0) return; /* (a read-only rootfs must already have it) */
    if (S_ISDIR(st.st_mode)) {
        make_dirs(dst);
        return;
    }
    char parent[4096];
    snprintf(parent, sizeof parent, "%s", dst);
    char *slash = strrchr(parent, '/');
    if (slash && slash != parent) {
        *slash = '\0';
        make_dirs(parent);
    }
    int fd = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0) die(SETUP_FAILED, "cannot create %s: %s", shown(dst), strerror(errno));
    close(fd);
}

static void bind(const char *src, const char *dst) {
    make_mount_point(src, dst);
    CHECK(mount(src, dst, NULL, MS_BIND | MS_REC, NULL), "cannot bind %s: %s", shown(src),
          strerror(errno));
}

/* Read-only (recursively: sub-mounts too), nosuid, nodev. */
static void make_read_only(const char *path, int recursive) {
    struct mount_attr_v0 attr = {.attr_set = ATTR_RDONLY | ATTR_NOSUID | ATTR_NODEV};
    if (syscall(SYS_mount_setattr, AT_FDCWD, path, recursive ? AT_RECURSIVE_FLAG : 0, &attr,
                sizeof attr) == 0)
        return;
    if (errno != ENOSYS) die(SETUP_FAILED, "cannot make %s read-only: %s", shown(path), strerror(errno));
    /* Kernels before 5.12: remount the top mount only. */
    CHECK(mount(NULL, path, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL),
          "cannot make %s read-only: %s", shown(path), strerror(errno));
}

static void join_cgroups(void) {
    char pid[32];
    snprintf(pid, sizeof pid, "%d\n", (int)getpid());
    for (int i = 0; i < opt.n_cgroups; i++) {
        int fd = open(opt.cgroups[i], O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, pid, strlen(pid)) < 0)
            die(SETUP_FAILED, "cannot join cgroup %s: %s", opt.cgroups[i], strerror(errno));
        close(fd);
    }
}

static void enter_namespaces(void) {
    if (opt.netns) {
        int fd = open(opt.netns, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || setns(fd, CLONE_NEWNET) < 0)
            die(SETUP_FAILED, "cannot join network namespace %s: %s", opt.netns,
                strerror(errno));
        close(fd);
    }
    if (opt.userns) {
        uid_t uid = geteuid();
        gid_t gid = getegid();
        char map[64];
        CHECK(unshare(CLONE_NEWUSER), "cannot create a user namespace: %s", strerror(errno));
        write_file("/proc/self/setgroups", "deny");
        snprintf(map, sizeof map, "%u %u 1\n", (unsigned)uid, (unsigned)uid);
        write_file("/proc/self/uid_map", map);
        snprintf(map, sizeof map, "%u %u 1\n", (unsigned)gid, (unsigned)gid);
        write_file("/proc/self/gid_map", map);
    }
    int flags = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP;
    if (!opt.netns) flags |= CLONE_NEWNET;
    CHECK(unshare(flags), "cannot create namespaces: %s", strerror(errno));
}

static void path_in(char *out, size_t size, const char *root, const char *path) {
    if (path[0] != '/') die(SETUP_FAILED, "path is not absolute: %s", path);
    if ((size_t)snprintf(out, size, "%s%s", root, path) >= size)
        die(SETUP_FAILED, "path too long: %s", path);
}

static void make_dev(void) {
    static const char *nodes[] = {"null", "zero", "full", "random", "urandom", "tty"};
    static const char *links[][2] = {{"/proc/self/fd", "fd"},     {"/proc/self/fd/0", "stdin"},
                                     {"/proc/self/fd/1", "stdout"}, {"/proc/self/fd/2", "stderr"},
                                     {"pts/ptmx", "ptmx"}};
    make_dirs("/newroot/dev");
    CHECK(mount("tmpfs", "/newroot/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755"),
          "cannot mount /dev: %s", strerror(errno));
    for (size_t i = 0; i < sizeof nodes / sizeof *nodes; i++) {
        char src[64], dst[64];
        snprintf(src, sizeof src, "/oldroot/dev/%s", nodes[i]);
        snprintf(dst, sizeof dst, "/newroot/dev/%s", nodes[i]);
        bind(src, dst);
    }
    for (size_t i = 0; i < sizeof links / sizeof *links; i++) {
        char dst[64];
        snprintf(dst, sizeof dst, "/newroot/dev/%s", links[i][1]);
        CHECK(symlink(links[i][0], dst), "cannot create %s: %s", dst, strerror(errno));
    }
    CHECK(mkdir("/newroot/dev/shm", 01777), "cannot create /dev/shm: %s", strerror(errno));
    CHECK(chmod("/newroot/dev/shm", 01777), "cannot chmod /dev/shm: %s", strerror(errno));
    CHECK(mkdir("/newroot/dev/pts", 0755), "cannot create /dev/pts: %s", strerror(errno));
    CHECK(mount("devpts", "/newroot/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
                "newinstance,ptmxmode=0666,mode=620"),
          "cannot mount /dev/pts: %s", strerror(errno));
}

/* The kernel knobs a fresh /proc would otherwise expose writable (as bubblewrap does). */
static void cover_proc(void) {
    static const char *covered[] = {"sys", "sysrq-trigger", "irq", "bus"};
    for (size_t i = 0; i < sizeof covered / sizeof *covered; i++) {
        char p[64];
        snprintf(p, sizeof p, "/newroot/proc/%s", covered[i]);
        if (access(p, F_OK) < 0) continue;
        CHECK(mount(p, p, NULL, MS_BIND | MS_REC, NULL), "cannot cover %s: %s", p,
              strerror(errno));
        make_read_only(p, 1);
    }
}

static int valid_key(const char *key, size_t len) {
    if (len == 0 || len > MAX_SECRET_KEY || !strcmp(key, ".") || !strcmp(key, "..")) return 0;
    for (size_t i = 0; i < len; i++)
        if (key[i] == '/' || (unsigned char)key[i] < 0x20) return 0;
    return 1;
}

static void write_fully(int fd, const unsigned char *data, size_t len, const char *key) {
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) die(SETUP_FAILED, "cannot write secret %s: %s", key, strerror(errno));
        data += n;
        len -= (size_t)n;
    }
}

/* /run/secrets: a tmpfs of this cell's mount namespace (it dies with the namespace), one
 * file per secret, mode 0400, owned by the workload's uid. The values come from the sealed
 * memfd (never argv, env or a host file); our copy in memory is cleared at once. */
static void mount_secrets(void) {
    struct stat st;
    if (fstat(opt.secrets_fd, &st) < 0) die(SETUP_FAILED, "bad --secrets: %s", strerror(errno));
    if (st.st_size > MAX_SECRET_BYTES + MAX_SECRETS * (MAX_SECRET_KEY + 9))
        die(SETUP_FAILED, "the secrets are larger than %d bytes", MAX_SECRET_BYTES);
    size_t size = (size_t)st.st_size;
    unsigned char *blob = malloc(size + 1);
    if (!blob) die(SETUP_FAILED, "out of memory for the secrets");
    size_t got = 0;
    while (got < size) {
        ssize_t n = pread(opt.secrets_fd, blob + got, size - got, (off_t)got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) die(SETUP_FAILED, "cannot read the secrets: %s", strerror(errno));
        got += (size_t)n;
    }
    close(opt.secrets_fd);
    opt.secrets_fd = -1;
    /* A page per file plus the values, rounded up: the tmpfs holds exactly these files. */
    char mount_opts[96];
    snprintf(mount_opts, sizeof mount_opts, "mode=0755,size=%zu,nr_inodes=%d",
             size + (size_t)(MAX_SECRETS + 1) * 4096, MAX_SECRETS + 8);
    make_dirs("/newroot" SECRETS_DIR);
    CHECK(mount("tmpfs", "/newroot" SECRETS_DIR, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                mount_opts),
          "cannot mount %s: %s", SECRETS_DIR, strerror(errno));
    size_t at = 0;
    while (at < size) {
        const char *key = (const char *)blob + at;
        size_t key_len = strnlen(key, size - at);
        if (key_len == size - at || at + key_len + 9 > size)
            die(SETUP_FAILED, "the secrets are malformed");
        if (!valid_key(key, key_len)) die(SETUP_FAILED, "a secret key is not a file name");
        if (n_secrets == MAX_SECRETS) die(SETUP_FAILED, "more than %d secrets", MAX_SECRETS);
        at += key_len + 1;
        uint64_t len = 0;
        for (int i = 0; i < 8; i++) len = (len << 8) | blob[at + i];
        at += 8;
        if (len > size - at) die(SETUP_FAILED, "the secrets are malformed");
        char path[sizeof("/newroot" SECRETS_DIR "/") + MAX_SECRET_KEY];
        snprintf(path, sizeof path, "/newroot" SECRETS_DIR "/%.128s", key);
        int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0400);
        if (fd < 0) die(SETUP_FAILED, "cannot create %s/%s: %s", SECRETS_DIR, key, strerror(errno));
        write_fully(fd, blob + at, (size_t)len, key);
        if (opt.uid >= 0 && fchown(fd, (uid_t)opt.uid, (gid_t)opt.gid) < 0)
            die(SETUP_FAILED, "cannot give %s/%s to the workload: %s", SECRETS_DIR, key,
                strerror(errno));
        CHECK(fchmod(fd, 0400), "cannot chmod %s/%s: %s", SECRETS_DIR, key, strerror(errno));
        memcpy(secrets[n_secrets].key, key, key_len + 1);
        if (opt.secret_lease > 0) {
            secrets[n_secrets].fd = fd;
        } else {
            close(fd);
            secrets[n_secrets].fd = -1;
        }
        n_secrets++;
        at += (size_t)len;
    }
    explicit_bzero(blob, size);
    free(blob);
}

static void on_lease_alarm(int sig) {
    (void)sig;
    lease_over = 1;
}

/* The lease ended: every secret file is emptied (also for a workload that holds it open) and
 * removed. pid 1 owns /run/secrets, so it needs no capability for this. */
static void end_lease(void) {
    for (int i = 0; i < n_secrets; i++) {
        char path[sizeof(SECRETS_DIR "/") + MAX_SECRET_KEY];
        snprintf(path, sizeof path, SECRETS_DIR "/%.128s", secrets[i].key);
        if (secrets[i].fd >= 0) {
            if (ftruncate(secrets[i].fd, 0) < 0) { /* the unlink below still removes it */ }
            close(secrets[i].fd);
            secrets[i].fd = -1;
        }
        unlink(path);
    }
}

static void build_root(void) {
    char dst[4096], src[4096];
    /* Nothing mounted from here on reaches the host, and nothing of the host's reaches us. */
    CHECK(mount(NULL, "/", NULL, MS_SLAVE | MS_REC, NULL), "cannot make / private: %s",
          strerror(errno));
    /* A staging tmpfs becomes the root for a moment so that the host tree stays reachable
     * as /oldroot (binds name their sources there) while the cell's root is built at
     * /newroot; then /newroot becomes the root and everything else is detached. */
    CHECK(mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
          "cannot mount the staging tmpfs: %s", strerror(errno));
    CHECK(chdir("/tmp"), "cannot enter the staging tmpfs: %s", strerror(errno));
    CHECK(mkdir("newroot", 0755), "cannot create newroot: %s", strerror(errno));
    CHECK(mkdir("oldroot", 0755), "cannot create oldroot: %s", strerror(errno));
    CHECK(syscall(SYS_pivot_root, ".", "oldroot"), "pivot_root: %s", strerror(errno));
    CHECK(chdir("/"), "chdir /: %s", strerror(errno));

    if (opt.rootfs) {
        path_in(src, sizeof src, "/oldroot", opt.rootfs);
        CHECK(mount(src, "/newroot", NULL, MS_BIND | MS_REC, NULL), "cannot bind rootfs %s: %s",
              opt.rootfs, strerror(errno));
        /* Read-only at once, sub-mounts included: the cell never writes into the operator's
         * directory, not even a mount point; a rootfs without /proc, /dev, /tmp or the
         * working directory is refused (read-only file system) rather than changed. */
        make_read_only("/newroot", 1);
    } else {
        CHECK(mount("tmpfs", "/newroot", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
              "cannot mount the root tmpfs: %s", strerror(errno));
    }
    for (int i = 0; i < opt.n_symlinks; i++) {
        path_in(dst, sizeof dst, "/newroot", opt.symlinks[i].b);
        if (symlink(opt.symlinks[i].a, dst) < 0 && errno != EEXIST)
            die(SETUP_FAILED, "cannot create symlink %s: %s", opt.symlinks[i].b, strerror(errno));
    }
    for (int i = 0; i < opt.n_ro_binds; i++) {
        path_in(src, sizeof src, "/oldroot", opt.ro_binds[i].a);
        path_in(dst, sizeof dst, "/newroot", opt.ro_binds[i].b);
        bind(src, dst);
        /* Read-only before anything else is mounted: a mount point created later (e.g. a
         * working directory under /usr) must fail, not appear in the host's tree. */
        make_read_only(dst, 1);
    }
    make_dirs("/newroot/proc");
    CHECK(mount("proc", "/newroot/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL),
          "cannot mount /proc: %s", strerror(errno));
    cover_proc();
    make_dev();
    make_dirs("/newroot/tmp");
    char tmp_opts[64];
    snprintf(tmp_opts, sizeof tmp_opts, "mode=1777,size=%s", opt.tmp_size ? opt.tmp_size : "64m");
    CHECK(mount("tmpfs", "/newroot/tmp", "tmpfs", MS_NOSUID | MS_NODEV, tmp_opts),
          "cannot mount /tmp: %s", strerror(errno));
    if (opt.secrets_fd >= 0) mount_secrets();
    path_in(src, sizeof src, "/oldroot", opt.workspace.a);
    path_in(dst, sizeof dst, "/newroot", opt.workspace.b);
    bind(src, dst);
    CHECK(mount(NULL, dst, NULL, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV, NULL),
          "cannot remount the workspace: %s", strerror(errno));
    /* The root itself (the tmpfs holding the mount points) is read-only too. */
    if (!opt.rootfs) make_read_only("/newroot", 0);

    CHECK(umount2("/oldroot", MNT_DETACH), "cannot detach the host root: %s", strerror(errno));
    CHECK(chdir("/newroot"), "cannot enter the new root: %s", strerror(errno));
    CHECK(syscall(SYS_pivot_root, ".", "."), "pivot_root: %s", strerror(errno));
    CHECK(umount2(".", MNT_DETACH), "cannot detach the staging root: %s", strerror(errno));
    CHECK(chdir("/"), "chdir /: %s", strerror(errno));
}

/* The bounding and ambient sets (dropping from the bounding set needs CAP_SETPCAP, so this
 * comes before any change of uid). */
static void drop_inheritable_capabilities(void) {
    /* Every capability the kernel knows: EINVAL marks the first one past the last. */
    for (int cap = 0; cap <= 63; cap++) {
        int held = prctl(PR_CAPBSET_READ, cap, 0, 0, 0);
        if (held < 0 && errno == EINVAL && cap > 0) break;
        if (held == 0) continue; /* already gone (a second call, after the uid change) */
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
            die(SETUP_FAILED, "cannot drop capability %d: %s", cap, strerror(errno));
    }
    CHECK(prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "ambient caps: %s",
          strerror(errno));
}

static void drop_capabilities(void) {
    drop_inheritable_capabilities();
    struct __user_cap_header_struct hdr = {.version = _LINUX_CAPABILITY_VERSION_3};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    CHECK(syscall(SYS_capset, &hdr, data), "cannot drop capabilities: %s", strerror(errno));
}

static void allow_beneath(int ruleset, const char *path, uint64_t access) {
    struct ll_path_beneath rule = {.allowed_access = access};
    rule.parent_fd = open(path, O_PATH | O_CLOEXEC);
    if (rule.parent_fd < 0) {
        if (errno == ENOENT) return;
        die(SETUP_FAILED, "landlock: cannot open %s: %s", path, strerror(errno));
    }
    CHECK(syscall(SYS_landlock_add_rule, ruleset, LL_RULE_PATH_BENEATH, &rule, 0),
          "landlock: cannot add a rule for %s: %s", path, strerror(errno));
    close(rule.parent_fd);
}

/* Read and execute everywhere in the cell; write only in the workspace, /tmp and /dev
 * (devices and /dev/shm). Writes into /proc (and anything a mistaken bind left writable) are
 * refused even to a process that would pass the permission checks. */
static void apply_landlock(void) {
    long abi = syscall(SYS_landlock_create_ruleset, NULL, 0, LL_CREATE_RULESET_VERSION);
    if (abi < 1) die(SETUP_FAILED, "landlock is not available: %s", strerror(errno));
    uint64_t all = LL_ABI1_ALL;
    if (abi >= 2) all |= LL_REFER;
    if (abi >= 3) all |= LL_TRUNCATE;
    if (abi >= 5) all |= LL_IOCTL_DEV;
    struct ll_ruleset_attr attr = {.handled_access_fs = all};
    if (abi >= 6) attr.scoped = LL_SCOPE_ABSTRACT_UNIX_SOCKET | LL_SCOPE_SIGNAL;
    size_t size = abi >= 6 ? sizeof attr : abi >= 4 ? 16 : 8;
    int ruleset = (int)syscall(SYS_landlock_create_ruleset, &attr, size, 0);
    CHECK(ruleset, "landlock: cannot create a ruleset: %s", strerror(errno));
    allow_beneath(ruleset, "/", LL_EXECUTE | LL_READ_FILE | LL_READ_DIR);
    uint64_t device = LL_READ_FILE | LL_WRITE_FILE | (all & (LL_TRUNCATE | LL_IOCTL_DEV));
    allow_beneath(ruleset, "/dev", device);
    allow_beneath(ruleset, "/dev/shm", all);
    allow_beneath(ruleset, "/tmp", all);
    allow_beneath(ruleset, opt.workspace.b, all);
    CHECK(syscall(SYS_landlock_restrict_self, ruleset, 0), "landlock: cannot restrict: %s",
          strerror(errno));
    close(ruleset);
}

static void close_other_fds(void) {
    /* Everything but stdio and the close-on-exec error descriptor. */
    int keep = opt.error_fd;
    if (keep < 3) {
        syscall(SYS_close_range, 3, ~0U, 0);
        return;
    }
    if (keep > 3) syscall(SYS_close_range, 3, keep - 1, 0);
    syscall(SYS_close_range, keep + 1, ~0U, 0);
}

static void __attribute__((noreturn)) exec_workload(void) {
    CHECK(setsid(), "setsid: %s", strerror(errno));
    if (chdir(opt.workspace.b) < 0)
        die(SETUP_FAILED, "cannot enter %s: %s", opt.workspace.b, strerror(errno));
    if (opt.uid >= 0) {
        drop_inheritable_capabilities();
        gid_t gid = (gid_t)opt.gid;
        uid_t uid = (uid_t)opt.uid;
        CHECK(setgroups(0, NULL), "setgroups: %s", strerror(errno));
        CHECK(setresgid(gid, gid, gid), "cannot switch to gid %u: %s", gid, strerror(errno));
        CHECK(setresuid(uid, uid, uid), "cannot switch to uid %u: %s", uid, strerror(errno));
    }
    CHECK(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs: %s", strerror(errno));
    drop_capabilities();
    if (opt.landlock) apply_landlock();
    close_other_fds();
    if (opt.seccomp_fd >= 0)
        CHECK(prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &seccomp_prog), "seccomp: %s",
              strerror(errno));
    execvp(opt.argv[0], opt.argv);
    die(EXEC_FAILED, "cannot execute %s: %s", opt.argv[0], strerror(errno));
}

static int exit_status(int status) {
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return SETUP_FAILED;
}

/* pid 1: reap everything; leave with the workload's status when it ends. It runs outside the
 * workload's seccomp and Landlock domain, so it keeps nothing worth taking: no capabilities,
 * and not dumpable, so that the workload (same uid) cannot open /proc/1/mem or /proc/1/environ
 * or attach to it. */
static void __attribute__((noreturn)) reap_until(pid_t workload) {
    if (opt.error_fd >= 0) close(opt.error_fd);
    if (opt.secret_lease > 0) {
        /* No SA_RESTART: the alarm interrupts wait() below. */
        struct sigaction sa = {.sa_handler = on_lease_alarm};
        sigemptyset(&sa.sa_mask);
        CHECK(sigaction(SIGALRM, &sa, NULL), "sigaction: %s", strerror(errno));
        alarm((unsigned)opt.secret_lease);
    }
    CHECK(prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable: %s", strerror(errno));
    CHECK(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs: %s", strerror(errno));
    drop_capabilities();
    for (;;) {
        int status;
        pid_t pid = wait(&status);
        if (lease_over == 1) {
            lease_over = 2;
            end_lease();
        }
        if (pid < 0 && errno == EINTR) continue;
        if (pid < 0) _exit(SETUP_FAILED);
        if (pid == workload) _exit(exit_status(status));
    }
}

/* Die with the parent from now on, and leave now if it is already gone (PR_SET_PDEATHSIG
 * does not fire for a parent that died before it was set). */
static void die_with_parent(pid_t expected_parent) {
    CHECK(prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "pdeathsig: %s", strerror(errno));
    if (expected_parent > 0 && getppid() != expected_parent)
        die(SETUP_FAILED, "the supervisor (pid %d) is gone", (int)expected_parent);
}

int main(int argc, char **argv) {
    parse(argc, argv);
    /* The supervisor passed it inheritable; it must close when the workload starts. */
    if (opt.error_fd >= 0 && fcntl(opt.error_fd, F_SETFD, FD_CLOEXEC) < 0)
        die(SETUP_FAILED, "bad --error-fd: %s", strerror(errno));
    die_with_parent((pid_t)opt.parent);
    if (opt.secrets_fd >= 0 && fcntl(opt.secrets_fd, F_SETFD, FD_CLOEXEC) < 0)
        die(SETUP_FAILED, "bad --secrets: %s", strerror(errno));
    if (opt.seccomp_fd >= 0) read_seccomp();
    join_cgroups();
    enter_namespaces();

    /* pid 1's parent (this process) is outside its pid namespace, where getppid() says 0: it
     * learns whether this process still lives from a pipe only this process holds open. */
    int alive[2];
    CHECK(pipe2(alive, O_CLOEXEC), "pipe: %s", strerror(errno));
    pid_t init = fork();
    CHECK(init, "fork: %s", strerror(errno));
    if (init > 0) {
        close(alive[0]);
        if (opt.error_fd >= 0) close(opt.error_fd);
        if (opt.secrets_fd >= 0) close(opt.secrets_fd); /* only the cell's pid 1 reads it */
        int status;
        while (waitpid(init, &status, 0) < 0)
            if (errno != EINTR) _exit(SETUP_FAILED);
        _exit(exit_status(status));
    }
    /* The cell's pid 1. */
    close(alive[1]);
    die_with_parent(0);
    struct pollfd parent = {.fd = alive[0], .events = POLLIN};
    if (poll(&parent, 1, 0) != 0) _exit(SETUP_FAILED); /* end of file: the launcher is gone */
    close(alive[0]);
    build_root();
    if (opt.hostname)
        CHECK(sethostname(opt.hostname, strlen(opt.hostname)), "sethostname: %s",
              strerror(errno));
    pid_t init_pid = getpid();
    pid_t workload = fork();
    CHECK(workload, "fork: %s", strerror(errno));
    if (workload == 0) {
        die_with_parent(init_pid);
        exec_workload();
    }
    reap_until(workload);
}
