/*
 * CellOS guest init: PID 1 of a CellOS microVM guest (DESIGN.md section 5).
 *
 * It runs exactly one workload and reports on the host channel, the first serial port
 * (/dev/ttyS0).  Every line on the channel is "CELLOS:<KIND>[:<field>...]\n":
 *
 *   CELLOS:READY                                  init is up, the workload is about to start
 *   CELLOS:IDLE                                   a pool guest waits for its request line
 *   CELLOS:PONG                                   a pool guest's answer to an empty line
 *   CELLOS:OUT:<base64 chunk>                     workload stdout
 *   CELLOS:ERR:<base64 chunk>                     workload stderr
 *   CELLOS:SPAWNERR:<message>                     the workload could not be started
 *   CELLOS:ART:<base64url path>:<base64 chunk>    artifact content (read as root)
 *   CELLOS:ARTEND:<base64url path>:<sha256 hex | MISSING>
 *   CELLOS:LIMITS:<oom kills>:<pids-limit hits>    the workload cgroup's counters
 *   CELLOS:UNAME:<uname -r>
 *   CELLOS:EXIT:<code>                            128+signal when killed, 127 spawn failure
 *
 * The request comes from the kernel command line (/proc/cmdline), or, in a pool guest
 * (cellos.pool=1 on the kernel command line), from one line on the channel in the same
 * "name=value ..." syntax, read once the guest is idle (it sends CELLOS:IDLE first):
 *   cellos.argv=<base64url JSON array of strings>          required
 *   cellos.env=<base64url JSON object string -> string>   optional (default: empty env)
 *   cellos.artifacts=<base64url JSON array of abs paths>  optional
 *   cellos.hostname=<base64url hostname>                  optional (the cell id, <= 64 bytes)
 *   cellos.workdir=<base64url absolute path>              optional (default /workspace)
 *   cellos.cgroup=<base64url JSON object file -> value>   optional: memory.max, pids.max
 *   cellos.secrets=1                                      optional: secrets follow on the channel
 *   cellos.secretlease=<seconds>                          optional: remove them after this long
 *   cellos.net=<base64url JSON object>                    optional: the guest's network device
 *                                                         (address CIDR, gateway, optional
 *                                                         address6 CIDR + gateway6, optional
 *                                                         nameserver); only a cell with egress
 *                                                         authority has one (see setup_network)
 * and on a pool guest's channel only:
 *   cellos.seed=<base64url 16-512 random bytes>           mixed into the kernel RNG, which is
 *                                                         then reseeded (RNDRESEEDCRNG)
 *   cellos.time=<base64url decimal ns since the epoch>    sets the clock (a restored snapshot
 *                                                         has the snapshot's)
 *
 * Secrets (secretDelivery runtimeBroker / runtimeLeasedBroker) never travel on the command
 * line: with cellos.secrets=1, init waits after READY for one line from the host on the
 * channel (raw mode: nothing is echoed), "CELLOS:SECRETS:<base64 blob>\n", where the blob is
 * (KEY NUL, 8-byte big-endian length, VALUE)*; each secret becomes /run/secrets/KEY (mode
 * 0400, owned by the workload's user) on a tmpfs, and init's copy is cleared.  With a lease,
 * init empties and removes the files that many seconds after the workload started.
 *
 * The workload runs in its own cgroup (v2, /sys/fs/cgroup/cell, memory and pids
 * controllers) with the limits of cellos.cgroup; its memory.events oom_kill and pids.events
 * max counters are reported after it exits (LIMITS), so an OOM kill or a refused fork is
 * evidence, not a guess.  The working directory is created if missing (owned by the
 * workload's user when created here) and is where the workload starts.
 *
 * The workload runs as uid/gid 65534 with no capabilities and no_new_privs, so it cannot
 * open the channel (or /dev/console, which is the same serial line) to forge lines.
 * When the workload exits, every other guest process is killed: the cell is over.
 *
 * Built statically (gcc -static -Os) so the initramfs needs no libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <arpa/inet.h>
#include <dirent.h>
#include <linux/openat2.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <linux/random.h>
#include <sys/ioctl.h>
#include <time.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <limits.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define NOBODY 65534
#define CHUNK 3072 /* raw bytes per OUT/ERR/ART line: 4096 base64 characters */
#define MAX_ART_PATH 1024 /* bytes; bounds the line buffers */
#define SECRETS_DIR "/run/secrets"
#define MAX_SECRETS 64
#define MAX_SECRET_KEY 128
#define MAX_SECRETS_LINE (3 << 20) /* base64 of 1 MiB of values plus keys, with room */
#define SECRETS_WAIT_MS 60000

static int chan = -1; /* the host channel; never inherited by the workload (O_CLOEXEC) */

/* ------------------------------------------------------------------ channel output */

static void write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return; /* nothing sensible left to do: the host will time out */
        }
        p += w;
        n -= (size_t)w;
    }
}

static const char B64STD[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static const char B64URL[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* Encode n bytes into out (size >= 4*ceil(n/3)+1), with '=' padding; returns length. */
static size_t b64_encode(const unsigned char *in, size_t n, char *out, const char *alpha)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        out[o++] = alpha[(v >> 18) & 63];
        out[o++] = alpha[(v >> 12) & 63];
        out[o++] = i + 1 < n ? alpha[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? alpha[v & 63] : '=';
    }
    out[o] = '\0';
    return o;
}

/* Send one line "CELLOS:<kind>:<payload>" (payload may be empty/NULL for "CELLOS:<kind>"). */
static void send_line(const char *kind, const char *payload)
{
    static char line[16384];
    int n = payload ? snprintf(line, sizeof line, "CELLOS:%s:%s\n", kind, payload)
                    : snprintf(line, sizeof line, "CELLOS:%s\n", kind);
    if (n > 0 && (size_t)n < sizeof line)
        write_all(chan, line, (size_t)n);
}

/* Send a chunk of bytes as CELLOS:<kind>:[<prefix>:]<base64>. */
static void send_chunk(const char *kind, const char *prefix, const unsigned char *p, size_t n)
{
    static char enc[4 * CHUNK / 3 + 8];
    static char payload[sizeof enc + 4 * MAX_ART_PATH / 3 + 16];
    b64_encode(p, n, enc, B64STD);
    if (prefix)
        snprintf(payload, sizeof payload, "%s:%s", prefix, enc);
    else
        snprintf(payload, sizeof payload, "%s", enc);
    send_line(kind, payload);
}

/* A message that is safe on one channel line: printable ASCII only, bounded length. */
static void send_text(const char *kind, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    for (char *c = msg; *c; c++)
        if (*c < 0x20 || *c > 0x7e)
            *c = '?';
    send_line(kind, msg);
}

/* ------------------------------------------------------------------ base64url decode */

static int b64_value(int c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '-' || c == '+') return 62; /* accept both alphabets: base64url is specified */
    if (c == '_' || c == '/') return 63;
    return -1;
}

/* Decode base64url (padding optional) into a fresh NUL-terminated buffer; NULL on error. */
static char *b64url_decode(const char *in, size_t n, size_t *outlen)
{
    while (n > 0 && in[n - 1] == '=')
        n--;
    if (n % 4 == 1)
        return NULL;
    char *out = malloc(n * 3 / 4 + 4);
    if (!out)
        return NULL;
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        int v = b64_value((unsigned char)in[i]);
        if (v < 0) {
            free(out);
            return NULL;
        }
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (char)((acc >> bits) & 0xff);
        }
    }
    out[o] = '\0';
    *outlen = o;
    return out;
}

/* ------------------------------------------------------------------ tiny JSON parser
 * Only the two shapes the protocol uses: an array of strings and an object whose values
 * are strings.  Strings are decoded to UTF-8; an embedded NUL is rejected because argv,
 * environment entries and paths cannot carry one.
 */

struct json {
    const char *p, *end;
    const char *err;
};

static void skip_ws(struct json *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static int hex4(struct json *j, unsigned *out)
{
    unsigned v = 0;
    if (j->end - j->p < 4)
        return -1;
    for (int i = 0; i < 4; i++) {
        char c = *j->p++;
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

static size_t put_utf8(char *o, unsigned cp)
{
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) {
        o[0] = (char)(0xc0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xe0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        o[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (char)(0xf0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    o[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* Parse a JSON string at j->p; returns a malloc'd NUL-terminated UTF-8 string or NULL. */
static char *json_string(struct json *j)
{
    skip_ws(j);
    if (j->p >= j->end || *j->p != '"') {
        j->err = "expected a string";
        return NULL;
    }
    j->p++;
    /* Decoded output is never longer than the escaped input (\uXXXX -> <= 3 bytes,
     * a surrogate pair of 12 characters -> 4 bytes). */
    char *out = malloc((size_t)(j->end - j->p) + 1), *o = out;
    if (!out) {
        j->err = "out of memory";
        return NULL;
    }
    while (j->p < j->end) {
        unsigned char c = (unsigned char)*j->p++;
        if (c == '"') {
            *o = '\0';
            return out;
        }
        if (c < 0x20) {
            j->err = "control character in string";
            break;
        }
        if (c != '\\') {
            *o++ = (char)c; /* raw UTF-8 bytes pass through unchanged */
            continue;
        }
        if (j->p >= j->end)
            break;
        c = (unsigned char)*j->p++;
        switch (c) {
        case '"': *o++ = '"'; continue;
        case '\\': *o++ = '\\'; continue;
        case '/': *o++ = '/'; continue;
        case 'b': *o++ = '\b'; continue;
        case 'f': *o++ = '\f'; continue;
        case 'n': *o++ = '\n'; continue;
        case 'r': *o++ = '\r'; continue;
        case 't': *o++ = '\t'; continue;
        case 'u': {
            unsigned cp, lo;
            if (hex4(j, &cp) < 0) {
                j->err = "bad \\u escape";
                goto fail;
            }
            if (cp >= 0xd800 && cp <= 0xdbff) { /* high surrogate: a low one must follow */
                if (j->end - j->p < 6 || j->p[0] != '\\' || j->p[1] != 'u') {
                    j->err = "unpaired surrogate";
                    goto fail;
                }
                j->p += 2;
                if (hex4(j, &lo) < 0 || lo < 0xdc00 || lo > 0xdfff) {
                    j->err = "unpaired surrogate";
                    goto fail;
                }
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            } else if (cp >= 0xdc00 && cp <= 0xdfff) {
                j->err = "unpaired surrogate";
                goto fail;
            }
            if (cp == 0) {
                j->err = "NUL in string";
                goto fail;
            }
            o += put_utf8(o, cp);
            continue;
        }
        default:
            j->err = "bad escape";
            goto fail;
        }
    }
    if (!j->err)
        j->err = "unterminated string";
fail:
    free(out);
    return NULL;
}

static int json_expect(struct json *j, char c)
{
    skip_ws(j);
    if (j->p < j->end && *j->p == c) {
        j->p++;
        return 0;
    }
    return -1;
}

static int json_done(struct json *j)
{
    skip_ws(j);
    if (j->p != j->end) {
        j->err = "trailing data";
        return -1;
    }
    return 0;
}

/* Parse ["a", "b", ...] into a NULL-terminated vector; count in *n. */
static char **json_string_array(struct json *j, size_t *n)
{
    size_t cap = 8, len = 0;
    char **v = calloc(cap + 1, sizeof *v);
    if (!v || json_expect(j, '[') < 0) {
        j->err = "expected an array";
        return NULL;
    }
    if (json_expect(j, ']') == 0)
        goto done;
    for (;;) {
        char *s = json_string(j);
        if (!s)
            return NULL;
        if (len == cap) {
            cap *= 2;
            v = realloc(v, (cap + 1) * sizeof *v);
            if (!v) {
                j->err = "out of memory";
                return NULL;
            }
        }
        v[len++] = s;
        if (json_expect(j, ',') == 0)
            continue;
        if (json_expect(j, ']') == 0)
            break;
        j->err = "expected ',' or ']'";
        return NULL;
    }
done:
    v[len] = NULL;
    if (json_done(j) < 0)
        return NULL;
    *n = len;
    return v;
}

/* Parse {"K": "V", ...} into a NULL-terminated "K=V" environment vector. */
static char **json_env_object(struct json *j)
{
    size_t cap = 8, len = 0;
    char **v = calloc(cap + 1, sizeof *v);
    if (!v || json_expect(j, '{') < 0) {
        j->err = "expected an object";
        return NULL;
    }
    if (json_expect(j, '}') == 0)
        goto done;
    for (;;) {
        char *k = json_string(j);
        if (!k)
            return NULL;
        if (!*k || strchr(k, '=')) {
            j->err = "environment name is empty or contains '='";
            return NULL;
        }
        if (json_expect(j, ':') < 0) {
            j->err = "expected ':'";
            return NULL;
        }
        char *val = json_string(j);
        if (!val)
            return NULL;
        if (len == cap) {
            cap *= 2;
            v = realloc(v, (cap + 1) * sizeof *v);
            if (!v) {
                j->err = "out of memory";
                return NULL;
            }
        }
        if (asprintf(&v[len++], "%s=%s", k, val) < 0) {
            j->err = "out of memory";
            return NULL;
        }
        free(k);
        free(val);
        if (json_expect(j, ',') == 0)
            continue;
        if (json_expect(j, '}') == 0)
            break;
        j->err = "expected ',' or '}'";
        return NULL;
    }
done:
    v[len] = NULL;
    if (json_done(j) < 0)
        return NULL;
    return v;
}

/* ------------------------------------------------------------------ SHA-256 (FIPS 180-4) */

struct sha256 {
    uint32_t h[8];
    uint64_t len;
    unsigned char buf[64];
    size_t fill;
};

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(struct sha256 *s, const unsigned char *b)
{
    uint32_t w[64], a, bb, c, d, e, f, g, h;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)b[4 * i] << 24 | (uint32_t)b[4 * i + 1] << 16 |
               (uint32_t)b[4 * i + 2] << 8 | b[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = s->h[0]; bb = s->h[1]; c = s->h[2]; d = s->h[3];
    e = s->h[4]; f = s->h[5]; g = s->h[6]; h = s->h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & bb) ^ (a & c) ^ (bb & c));
        h = g; g = f; f = e; e = d + t1; d = c; c = bb; bb = a; a = t1 + t2;
    }
    s->h[0] += a; s->h[1] += bb; s->h[2] += c; s->h[3] += d;
    s->h[4] += e; s->h[5] += f; s->h[6] += g; s->h[7] += h;
}

static void sha256_init(struct sha256 *s)
{
    static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->h, iv, sizeof iv);
    s->len = 0;
    s->fill = 0;
}

static void sha256_update(struct sha256 *s, const unsigned char *p, size_t n)
{
    s->len += n;
    while (n > 0) {
        size_t take = 64 - s->fill < n ? 64 - s->fill : n;
        memcpy(s->buf + s->fill, p, take);
        s->fill += take;
        p += take;
        n -= take;
        if (s->fill == 64) {
            sha256_block(s, s->buf);
            s->fill = 0;
        }
    }
}

static void sha256_hex(struct sha256 *s, char out[65])
{
    uint64_t bits = s->len * 8;
    unsigned char pad = 0x80, zero = 0, lenb[8];
    sha256_update(s, &pad, 1);
    while (s->fill != 56)
        sha256_update(s, &zero, 1);
    for (int i = 0; i < 8; i++)
        lenb[i] = (unsigned char)(bits >> (56 - 8 * i));
    sha256_update(s, lenb, 8);
    for (int i = 0; i < 8; i++)
        snprintf(out + 8 * i, 9, "%08x", s->h[i]);
}

/* ------------------------------------------------------------------ setup */

/* Find "name=value" on the kernel command line; returns the decoded JSON text or NULL. */
static char *cmdline_param(const char *cmdline, const char *name, const char **err)
{
    size_t nl = strlen(name);
    for (const char *p = cmdline; *p;) {
        while (*p == ' ' || *p == '\n')
            p++;
        const char *tok = p;
        while (*p && *p != ' ' && *p != '\n')
            p++;
        if ((size_t)(p - tok) > nl && !strncmp(tok, name, nl) && tok[nl] == '=') {
            size_t len;
            char *dec = b64url_decode(tok + nl + 1, (size_t)(p - tok - nl - 1), &len);
            if (!dec || strlen(dec) != len) /* a NUL byte is never valid JSON text */
                *err = "not valid base64url";
            return dec;
        }
    }
    return NULL;
}

static void fail_spawn(const char *what, const char *why) __attribute__((noreturn));

/* Is the exact token present on the kernel command line? */
static int cmdline_flag(const char *cmdline, const char *token)
{
    size_t tl = strlen(token);
    for (const char *p = cmdline; (p = strstr(p, token)) != NULL; p += tl)
        if ((p == cmdline || p[-1] == ' ') && (p[tl] == ' ' || p[tl] == '\n' || p[tl] == '\0'))
            return 1;
    return 0;
}

/* A pool guest's request: one line on the channel, in the kernel command line's syntax
 * ("cellos.argv=<b64url> cellos.env=<b64url> ..."), at most MAX_REQUEST bytes.  An empty
 * line before it is the host asking whether this guest is alive: answered with PONG. */
#define MAX_REQUEST (1 << 20)
static char *read_request(void)
{
    char *buf = malloc(MAX_REQUEST + 1);
    size_t len = 0, scanned = 0;
    if (!buf)
        fail_spawn("request", "out of memory");
    for (;;) {
        char *nl;
        while ((nl = memchr(buf + scanned, '\n', len - scanned)) != NULL) {
            if (nl != buf) {
                *nl = '\0';
                return buf;
            }
            send_line("PONG", NULL);
            memmove(buf, buf + 1, --len);
            scanned = 0;
        }
        scanned = len;
        if (len >= MAX_REQUEST)
            fail_spawn("request", "longer than 1 MiB");
        ssize_t n = read(chan, buf + len, MAX_REQUEST - len);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n <= 0)
            fail_spawn("request", n < 0 ? strerror(errno) : "channel closed");
        len += (size_t)n;
    }
}

static void mount_fs(void)
{
    /* Errors are ignored on purpose: a missing /proc shows up as a clear SPAWNERR later,
     * and the kernel may already have mounted devtmpfs (CONFIG_DEVTMPFS_MOUNT). */
    mkdir("/proc", 0555);
    mkdir("/sys", 0555);
    mkdir("/dev", 0755);
    mkdir("/tmp", 01777);
    mkdir("/workspace", 0755);
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755");
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    mount("tmpfs", "/workspace", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,uid=65534,gid=65534");
    /* The serial line is the channel; /dev/console and /dev/kmsg reach it too (console=ttyS0).
     * Make them root-only so the unprivileged workload cannot write forged lines. */
    static const char *const priv[] = {"/dev/ttyS0", "/dev/ttyS1", "/dev/ttyS2", "/dev/ttyS3",
                                       "/dev/console", "/dev/kmsg", "/dev/tty0", "/dev/hvc0",
                                       "/dev/mem", "/dev/port", NULL};
    for (int i = 0; priv[i]; i++)
        chmod(priv[i], 0600);
}

static void open_channel(void)
{
    chan = open("/dev/ttyS0", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (chan < 0) {
        /* Without a channel nobody can hear us; power off so the host sees no EXIT. */
        sync();
        reboot(RB_POWER_OFF);
        _exit(1);
    }
    /* Raw mode: no echo of anything the host sends, no CR/LF translation of our output. */
    struct termios t;
    if (tcgetattr(chan, &t) == 0) {
        cfmakeraw(&t);
        t.c_cflag |= CLOCAL;
        cfsetspeed(&t, B115200);
        tcsetattr(chan, TCSANOW, &t);
    }
}

/* ------------------------------------------------------------------ network device */

/* The virtio-net driver and what it needs, in load order (dependencies first: the image
 * names them NN-<module>.ko).  The guest kernel has them as modules; they are loaded only
 * for a cell with egress authority, so a cell without one has no network device at all
 * (the VMM gives it none either). */
#define NET_MODULES "/lib/modules/cellos-net"
#define NET_DEVICE "eth0"
#define NET_DEVICE_WAIT_MS 5000

static int by_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static const char *load_net_modules(void)
{
    static char why[320];
    DIR *d = opendir(NET_MODULES);
    if (!d)
        return "the image has no network driver modules (" NET_MODULES ")";
    char *names[32];
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL && n < 32)
        if (e->d_name[0] != '.')
            names[n++] = strdup(e->d_name);
    closedir(d);
    qsort(names, n, sizeof *names, by_name);
    const char *err = NULL;
    for (size_t i = 0; i < n; i++) {
        char path[512];
        snprintf(path, sizeof path, NET_MODULES "/%s", names[i]);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (!err && (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST))) {
            snprintf(why, sizeof why, "loading %s: %s", names[i], strerror(errno));
            err = why;
        }
        if (fd >= 0)
            close(fd);
        free(names[i]);
    }
    return err;
}

static const char *net_value(char **settings, const char *key)
{
    size_t k = strlen(key);
    for (char **p = settings; p && *p; p++)
        if (strncmp(*p, key, k) == 0 && (*p)[k] == '=')
            return *p + k + 1;
    return NULL;
}

static int set_in_addr(struct sockaddr *sa, const char *text)
{
    struct sockaddr_in *in = (struct sockaddr_in *)sa;
    memset(in, 0, sizeof *in);
    in->sin_family = AF_INET;
    return inet_pton(AF_INET, text, &in->sin_addr) == 1 ? 0 : -1;
}

static int write_file(const char *path, const char *value);

/* linux/ipv6.h's in6_ifreq (that header clashes with glibc's netinet/in.h). */
struct cellos_in6_ifreq {
    struct in6_addr addr;
    uint32_t prefixlen;
    int ifindex;
};

/* The IPv6 address and default route (a cell with an IPv6 rule): without duplicate address
 * detection (the guest is alone on its link), so the address is usable at once. */
static const char *setup_ipv6(const char *cidr, const char *gw, int ifindex)
{
    static char why[320];
    char addr[INET6_ADDRSTRLEN];
    const char *slash = strchr(cidr, '/');
    int prefix = slash ? atoi(slash + 1) : -1;
    if (!slash || (size_t)(slash - cidr) >= sizeof addr || prefix < 1 || prefix > 128)
        return "address6 must be an IPv6 CIDR";
    memcpy(addr, cidr, (size_t)(slash - cidr));
    addr[slash - cidr] = '\0';
    struct cellos_in6_ifreq req = {.prefixlen = (uint32_t)prefix, .ifindex = ifindex};
    struct in6_rtmsg rt;
    memset(&rt, 0, sizeof rt);
    if (inet_pton(AF_INET6, addr, &req.addr) != 1 ||
        inet_pton(AF_INET6, gw, &rt.rtmsg_gateway) != 1)
        return "address6 / gateway6: not an IPv6 address";
    if (write_file("/proc/sys/net/ipv6/conf/" NET_DEVICE "/accept_dad", "0") < 0) {
        snprintf(why, sizeof why, "IPv6 on " NET_DEVICE ": %s", strerror(errno));
        return why;
    }
    int s = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    const char *step = "address6";
    if (s < 0 || ioctl(s, SIOCSIFADDR, &req) < 0)
        goto fail;
    step = "IPv6 default route";
    rt.rtmsg_flags = RTF_UP | RTF_GATEWAY;
    rt.rtmsg_metric = 1;
    rt.rtmsg_ifindex = ifindex;
    if (ioctl(s, SIOCADDRT, &rt) < 0)
        goto fail;
    close(s);
    return NULL;
fail:
    snprintf(why, sizeof why, "%s: %s", step, strerror(errno));
    if (s >= 0)
        close(s);
    return why;
}

/* Address, default route and resolver of the guest's one network device, with ioctls (no
 * ip/ifconfig in the image), done by init as root before the workload exists: the
 * unprivileged workload cannot change them.  What the guest may reach is decided outside
 * it, by the cell's nft table (the tap is inside the cell's network namespace).  Returns
 * NULL or why it failed. */
static const char *setup_network(char **settings)
{
    static char why[320];
    const char *cidr = net_value(settings, "address"), *gw = net_value(settings, "gateway");
    const char *ns = net_value(settings, "nameserver");
    if (!cidr || !gw)
        return "needs address and gateway";
    char addr[INET_ADDRSTRLEN];
    const char *slash = strchr(cidr, '/');
    int prefix = slash ? atoi(slash + 1) : -1;
    if (!slash || (size_t)(slash - cidr) >= sizeof addr || prefix < 1 || prefix > 32)
        return "address must be an IPv4 CIDR";
    memcpy(addr, cidr, (size_t)(slash - cidr));
    addr[slash - cidr] = '\0';
    const char *err = load_net_modules();
    if (err)
        return err;
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return strerror(errno);
    struct ifreq ifr;
    /* The driver registers the device while its module loads; allow for a slow probe. */
    for (long waited = 0;; waited += 10) {
        memset(&ifr, 0, sizeof ifr);
        strcpy(ifr.ifr_name, NET_DEVICE);
        if (ioctl(s, SIOCGIFINDEX, &ifr) == 0)
            break;
        if (waited >= NET_DEVICE_WAIT_MS) {
            close(s);
            return "no network device " NET_DEVICE " appeared";
        }
        usleep(10000);
    }
    int ifindex = ifr.ifr_ifindex;
    const char *step = "address";
    if (set_in_addr(&ifr.ifr_addr, addr) < 0)
        goto bad;
    if (ioctl(s, SIOCSIFADDR, &ifr) < 0)
        goto fail;
    step = "netmask";
    struct sockaddr_in *mask = (struct sockaddr_in *)&ifr.ifr_netmask;
    memset(mask, 0, sizeof *mask);
    mask->sin_family = AF_INET;
    mask->sin_addr.s_addr = htonl(0xffffffffu << (32 - prefix));
    if (ioctl(s, SIOCSIFNETMASK, &ifr) < 0)
        goto fail;
    step = "up";
    for (int i = 0; i < 2; i++) { /* lo too: loopback works in a networked guest */
        strcpy(ifr.ifr_name, i ? NET_DEVICE : "lo");
        if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
            goto fail;
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
            goto fail;
    }
    step = "default route";
    struct rtentry rt;
    memset(&rt, 0, sizeof rt);
    set_in_addr(&rt.rt_dst, "0.0.0.0");
    set_in_addr(&rt.rt_genmask, "0.0.0.0");
    if (set_in_addr(&rt.rt_gateway, gw) < 0)
        goto bad;
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    rt.rt_dev = (char *)NET_DEVICE;
    if (ioctl(s, SIOCADDRT, &rt) < 0)
        goto fail;
    close(s);
    const char *cidr6 = net_value(settings, "address6"), *gw6 = net_value(settings, "gateway6");
    if (cidr6 || gw6) {
        if (!cidr6 || !gw6)
            return "address6 needs gateway6";
        if ((err = setup_ipv6(cidr6, gw6, ifindex)) != NULL)
            return err;
    }
    if (ns) {
        /* The cell's DNS proxy (through the gateway): the only resolver the guest knows. */
        char line[128];
        struct in_addr check;
        if (inet_pton(AF_INET, ns, &check) != 1)
            return "nameserver must be an IPv4 address";
        snprintf(line, sizeof line, "nameserver %s\noptions timeout:2 attempts:2\n", ns);
        mkdir("/etc", 0755);
        int fd = open("/etc/resolv.conf", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0 || write(fd, line, strlen(line)) != (ssize_t)strlen(line)) {
            snprintf(why, sizeof why, "/etc/resolv.conf: %s", strerror(errno));
            if (fd >= 0)
                close(fd);
            return why;
        }
        close(fd);
    }
    return NULL;
bad:
    close(s);
    snprintf(why, sizeof why, "%s: not an IPv4 address", step);
    return why;
fail:
    snprintf(why, sizeof why, "%s: %s", step, strerror(errno));
    close(s);
    return why;
}

/* ------------------------------------------------------------------ cell cgroup, workdir */

#define CELL_CG "/sys/fs/cgroup/cell"

static int write_file(const char *path, const char *value)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = write(fd, value, strlen(value));
    int saved = errno;
    close(fd);
    errno = saved;
    return n == (ssize_t)strlen(value) ? 0 : -1;
}

/* The cgroup hierarchy and the (empty) cell cgroup; done once (a pool guest does it before
 * it waits for its request).  Returns NULL or why it failed. */
static const char *setup_cgroup_base(void)
{
    static char why[256];
    static int done = 0;
    if (done)
        return NULL;
    mkdir("/sys/fs/cgroup", 0755);
    if (mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        return snprintf(why, sizeof why, "mount cgroup2: %s", strerror(errno)), why;
    if (write_file("/sys/fs/cgroup/cgroup.subtree_control", "+memory +pids") < 0)
        return snprintf(why, sizeof why, "enable memory, pids: %s", strerror(errno)), why;
    if (mkdir(CELL_CG, 0755) < 0)
        return snprintf(why, sizeof why, "mkdir %s: %s", CELL_CG, strerror(errno)), why;
    done = 1;
    return NULL;
}

/* The workload's cgroup: memory + pids controllers, settings "file=value" from the host.
 * Returns NULL or the reason it cannot be set up (the workload must not run unlimited). */
static const char *setup_cgroup(char **settings)
{
    static char why[256];
    const char *base = setup_cgroup_base();
    if (base)
        return base;
    for (char **s = settings; s && *s; s++) {
        char *eq = strchr(*s, '='), path[256];
        *eq = '\0';
        if (strcmp(*s, "memory.max") && strcmp(*s, "memory.swap.max") && strcmp(*s, "pids.max"))
            return snprintf(why, sizeof why, "cgroup setting %.64s is not allowed", *s), why;
        snprintf(path, sizeof path, CELL_CG "/%s", *s);
        if (write_file(path, eq + 1) < 0)
            return snprintf(why, sizeof why, "%s = %.32s: %s", *s, eq + 1, strerror(errno)), why;
        *eq = '=';
    }
    return NULL;
}

/* "key N" from a cgroup events file; 0 when absent. */
static unsigned long cg_counter(const char *file, const char *key)
{
    char buf[1024], path[256];
    snprintf(path, sizeof path, CELL_CG "/%s", file);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    size_t kl = strlen(key);
    for (char *line = buf; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL)
        if (!strncmp(line, key, kl) && line[kl] == ' ')
            return strtoul(line + kl + 1, NULL, 10);
    return 0;
}

/* mkdir -p; the directories created here are handed to the workload's user. Returns NULL or
 * why it failed. */
static const char *make_workdir(const char *path)
{
    static char why[PATH_MAX + 64];
    char buf[PATH_MAX];
    if (path[0] != '/' || strlen(path) >= sizeof buf)
        return "must be an absolute path shorter than PATH_MAX";
    strcpy(buf, path);
    for (char *p = buf + 1;; p++) {
        if (*p != '/' && *p != '\0')
            continue;
        char saved = *p;
        *p = '\0';
        if (buf[1] != '\0') {
            if (mkdir(buf, 0755) == 0) {
                if (chown(buf, NOBODY, NOBODY) < 0)
                    return snprintf(why, sizeof why, "chown %s: %s", buf, strerror(errno)), why;
            } else if (errno != EEXIST) {
                return snprintf(why, sizeof why, "mkdir %s: %s", buf, strerror(errno)), why;
            }
        }
        *p = saved;
        if (saved == '\0')
            break;
    }
    struct stat sb;
    if (stat(path, &sb) < 0 || !S_ISDIR(sb.st_mode))
        return snprintf(why, sizeof why, "%s is not a directory", path), why;
    return NULL;
}

/* ------------------------------------------------------------------ the workload */

/* Drop to nobody: no groups, no capabilities (bounding set included), no_new_privs. */
static int drop_privileges(void)
{
    for (int cap = 0; cap <= 63; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
            return -1;
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
        return -1;
    if (setgroups(0, NULL) < 0 || setresgid(NOBODY, NOBODY, NOBODY) < 0 ||
        setresuid(NOBODY, NOBODY, NOBODY) < 0) /* clears permitted/effective capabilities */
        return -1;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return -1;
    return 0;
}

/* execve with a PATH search when argv[0] has no slash (PATH from the given env, or /bin). */
static void exec_workload(char **argv, char **envp)
{
    if (strchr(argv[0], '/')) {
        execve(argv[0], argv, envp);
        return;
    }
    const char *path = "/bin:/usr/bin";
    for (char **e = envp; *e; e++)
        if (!strncmp(*e, "PATH=", 5))
            path = *e + 5;
    int saved = ENOENT;
    char buf[4096];
    for (const char *p = path;; p++) {
        const char *colon = strchrnul(p, ':');
        int n = snprintf(buf, sizeof buf, "%.*s/%s", (int)(colon - p), p, argv[0]);
        if (n > 0 && (size_t)n < sizeof buf) {
            execve(buf, argv, envp);
            if (errno != ENOENT)
                saved = errno;
        }
        if (!*colon)
            break;
        p = colon;
    }
    errno = saved;
}

static const char *workdir = "/workspace";
static int use_cgroup = 0;

/* ------------------------------------------------------------------ secrets as files */

static struct {
    char key[MAX_SECRET_KEY + 1];
    int fd; /* kept (root only, init's) to empty the file when the lease ends */
} secrets[MAX_SECRETS];
static int n_secrets;
static long secret_lease; /* seconds; 0: no lease */

/* Read the secrets line from the host; NULL or why not.  The line is cleared after use. */
static const char *receive_secrets(void)
{
    static char why[160];
    static const char prefix[] = "CELLOS:SECRETS:";
    char *line = malloc(MAX_SECRETS_LINE + 1);
    if (!line)
        return "out of memory";
    size_t len = 0;
    for (;;) {
        struct pollfd pf = {chan, POLLIN, 0};
        int r = poll(&pf, 1, SECRETS_WAIT_MS);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            free(line);
            return r == 0 ? "the host sent no secrets" : "poll failed";
        }
        ssize_t n = read(chan, line + len, MAX_SECRETS_LINE - len);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n <= 0) {
            free(line);
            return "the channel closed before the secrets arrived";
        }
        len += (size_t)n;
        if (memchr(line + len - (size_t)n, '\n', (size_t)n))
            break;
        if (len == MAX_SECRETS_LINE) {
            explicit_bzero(line, len);
            free(line);
            return "the secrets line is too long";
        }
    }
    char *nl = memchr(line, '\n', len);
    size_t plen = sizeof prefix - 1;
    const char *result = NULL;
    size_t size = 0;
    unsigned char *blob = NULL;
    if ((size_t)(nl - line) < plen || memcmp(line, prefix, plen)) {
        result = "malformed secrets line";
        goto out;
    }
    blob = (unsigned char *)b64url_decode(line + plen, (size_t)(nl - line) - plen, &size);
    if (!blob) {
        result = "malformed secrets line";
        goto out;
    }
    mkdir("/run", 0755);
    mkdir(SECRETS_DIR, 0755);
    char opts[96];
    snprintf(opts, sizeof opts, "mode=0755,size=%zu,nr_inodes=%d",
             size + (size_t)(MAX_SECRETS + 1) * 4096, MAX_SECRETS + 8);
    if (mount("tmpfs", SECRETS_DIR, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts) < 0) {
        result = (snprintf(why, sizeof why, "mount %s: %s", SECRETS_DIR, strerror(errno)), why);
        goto out;
    }
    for (size_t at = 0; at < size;) {
        const char *key = (const char *)blob + at;
        size_t klen = strnlen(key, size - at);
        if (klen == 0 || klen > MAX_SECRET_KEY || klen == size - at || at + klen + 9 > size ||
            strchr(key, '/') || !strcmp(key, ".") || !strcmp(key, "..") ||
            n_secrets == MAX_SECRETS) {
            result = "malformed secrets";
            goto out;
        }
        at += klen + 1;
        uint64_t vlen = 0;
        for (int i = 0; i < 8; i++)
            vlen = (vlen << 8) | blob[at + i];
        at += 8;
        if (vlen > size - at) {
            result = "malformed secrets";
            goto out;
        }
        char path[sizeof SECRETS_DIR + MAX_SECRET_KEY + 2];
        snprintf(path, sizeof path, SECRETS_DIR "/%.128s", key);
        int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0400);
        if (fd < 0) {
            result = (snprintf(why, sizeof why, "create %s: %s", path, strerror(errno)), why);
            goto out;
        }
        write_all(fd, (const char *)blob + at, (size_t)vlen);
        if (fchown(fd, NOBODY, NOBODY) < 0 || fchmod(fd, 0400) < 0) {
            close(fd);
            result = (snprintf(why, sizeof why, "chown %s: %s", path, strerror(errno)), why);
            goto out;
        }
        memcpy(secrets[n_secrets].key, key, klen + 1);
        secrets[n_secrets].fd = fd;
        if (!secret_lease) {
            close(fd);
            secrets[n_secrets].fd = -1;
        }
        n_secrets++;
        at += (size_t)vlen;
    }
out:
    if (blob) {
        explicit_bzero(blob, size);
        free(blob);
    }
    explicit_bzero(line, len);
    free(line);
    return result;
}

/* The lease ended: empty every secret file (also for a descriptor the workload holds) and
 * remove it. */
static void end_lease(void)
{
    for (int i = 0; i < n_secrets; i++) {
        char path[sizeof SECRETS_DIR + MAX_SECRET_KEY + 2];
        snprintf(path, sizeof path, SECRETS_DIR "/%.128s", secrets[i].key);
        if (secrets[i].fd >= 0) {
            if (ftruncate(secrets[i].fd, 0) < 0) { /* the unlink below still removes it */ }
            close(secrets[i].fd);
            secrets[i].fd = -1;
        }
        unlink(path);
    }
}

static long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static void child(char **argv, char **envp, int in, int out, int err, int report)
{
    const char *step = "stdin";
    /* stdin is a pipe whose write end is already closed: the workload reads EOF at once. */
    if (dup2(in, 0) < 0)
        goto fail;
    step = "stdio";
    if (dup2(out, 1) < 0 || dup2(err, 2) < 0)
        goto fail;
    step = "setsid";
    if (setsid() < 0)
        goto fail;
    step = "cgroup";
    if (use_cgroup && write_file(CELL_CG "/cgroup.procs", "0") < 0)
        goto fail;
    step = "chdir";
    if (chdir(workdir) < 0)
        goto fail;
    step = "drop privileges";
    if (drop_privileges() < 0)
        goto fail;
    /* Signals init ignores must not stay ignored in the workload. */
    signal(SIGPIPE, SIG_DFL);
    step = "exec";
    exec_workload(argv, envp);
fail:;
    /* Tell init why over the CLOEXEC report pipe: a successful exec closes it silently. */
    char msg[512];
    int n = snprintf(msg, sizeof msg, "%s %s: %s", step, argv[0], strerror(errno));
    if (n > 0)
        write_all(report, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
    _exit(127);
}

struct stream {
    int fd;
    const char *kind;
};

/* Relay one read from a pipe; returns 0 at EOF. */
static int relay(struct stream *s)
{
    unsigned char buf[CHUNK];
    ssize_t n = read(s->fd, buf, sizeof buf);
    if (n < 0 && (errno == EINTR || errno == EAGAIN))
        return 1;
    if (n <= 0) {
        close(s->fd);
        s->fd = -1;
        return 0;
    }
    send_chunk(s->kind, NULL, buf, (size_t)n);
    return 1;
}

/* Run the workload; returns its exit code in the CELLOS:EXIT convention. */
static int run_workload(char **argv, char **envp)
{
    int in[2], out[2], err[2], rep[2];
    if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0 ||
        pipe2(rep, O_CLOEXEC) < 0) {
        send_text("SPAWNERR", "pipe: %s", strerror(errno));
        return 127;
    }
    pid_t pid = fork();
    if (pid < 0) {
        send_text("SPAWNERR", "fork: %s", strerror(errno));
        return 127;
    }
    close(in[1]);
    if (pid == 0)
        child(argv, envp, in[0], out[1], err[1], rep[1]);
    close(in[0]);
    close(out[1]);
    close(err[1]);
    close(rep[1]);

    struct stream st[2] = {{out[0], "OUT"}, {err[0], "ERR"}};
    int status = 0, exited = 0;
    long lease_end = secret_lease ? now_ms() + secret_lease * 1000L : 0;
    while (st[0].fd >= 0 || st[1].fd >= 0 || !exited) {
        if (lease_end && now_ms() >= lease_end) {
            lease_end = 0;
            end_lease();
        }
        if (st[0].fd < 0 && st[1].fd < 0 && !lease_end) {
            /* Both streams are closed and no lease is left to end: wait for the workload
             * itself (no polling delay). */
            int ws;
            pid_t w = waitpid(-1, &ws, 0);
            if (w == pid) {
                status = ws;
                exited = 1;
                kill(-1, SIGKILL);
            } else if (w < 0 && errno != EINTR) {
                break; /* no child left: cannot happen while the workload is unreaped */
            }
            continue;
        }
        struct pollfd pf[2] = {{st[0].fd, POLLIN, 0}, {st[1].fd, POLLIN, 0}};
        /* Short timeout: waitpid below notices the workload's exit without SIGCHLD plumbing. */
        int r = poll(pf, 2, exited ? -1 : 50);
        if (r > 0)
            for (int i = 0; i < 2; i++)
                if (pf[i].revents)
                    relay(&st[i]);
        /* As PID 1 we inherit every orphan: reap them all, note the workload's status. */
        int ws;
        pid_t w;
        while ((w = waitpid(-1, &ws, WNOHANG)) > 0)
            if (w == pid) {
                status = ws;
                exited = 1;
                /* The cell ends with its workload: kill leftovers (they may hold the pipes
                 * open) so the drain below reaches EOF.  kill(-1) spares PID 1 itself. */
                kill(-1, SIGKILL);
            }
    }
    while (waitpid(-1, NULL, 0) > 0) /* reap the killed leftovers */
        ;
    if (use_cgroup) {
        char counters[64];
        snprintf(counters, sizeof counters, "%lu:%lu", cg_counter("memory.events", "oom_kill"),
                 cg_counter("pids.events", "max"));
        send_line("LIMITS", counters);
    }

    char why[512];
    ssize_t n = read(rep[0], why, sizeof why - 1);
    close(rep[0]);
    if (n > 0) {
        why[n] = '\0';
        send_text("SPAWNERR", "%s", why);
        return 127;
    }
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return 127;
}

/* ------------------------------------------------------------------ artifacts */

static void send_artifact(const char *path)
{
    char tag[4 * MAX_ART_PATH / 3 + 8], hex[65];
    b64_encode((const unsigned char *)path, strlen(path), tag, B64URL);
    /* openat2 with RESOLVE_NO_SYMLINKS: the workload owns /workspace and could plant a
     * symlink to make root read something else; such a path reports MISSING. */
    struct open_how how = {.flags = O_RDONLY | O_CLOEXEC | O_NOFOLLOW,
                           .resolve = RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS};
    int fd = (int)syscall(SYS_openat2, AT_FDCWD, path, &how, sizeof how);
    struct stat sb;
    if (fd < 0 || fstat(fd, &sb) < 0 || !S_ISREG(sb.st_mode)) {
        if (fd >= 0)
            close(fd);
        snprintf(hex, sizeof hex, "MISSING");
        goto end;
    }
    struct sha256 s;
    sha256_init(&s);
    unsigned char buf[CHUNK];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        sha256_update(&s, buf, (size_t)n);
        send_chunk("ART", tag, buf, (size_t)n);
    }
    close(fd);
    sha256_hex(&s, hex);
end:;
    char payload[sizeof tag + 80];
    snprintf(payload, sizeof payload, "%s:%s", tag, hex);
    send_line("ARTEND", payload);
}

/* ------------------------------------------------------------------ main */

static void finish(int code) __attribute__((noreturn));
static void finish(int code)
{
    struct utsname u;
    if (uname(&u) == 0)
        send_text("UNAME", "%s", u.release);
    char num[16];
    snprintf(num, sizeof num, "%d", code);
    send_line("EXIT", num);
    tcdrain(chan); /* the host must see EXIT before the machine disappears */
    sync();
    reboot(RB_POWER_OFF);
    reboot(RB_AUTOBOOT); /* with -no-reboot the VMM exits on reset too */
    for (;;)
        pause(); /* PID 1 must never exit: that would panic the kernel */
}

static void fail_spawn(const char *what, const char *why)
{
    send_text("SPAWNERR", "%s: %s", what, why);
    finish(127);
}

int main(void)
{
    mount_fs();
    open_channel();
    signal(SIGPIPE, SIG_IGN); /* a closed channel must not kill PID 1 */
    /* Firmware (SeaBIOS on q35/pc) may leave escape codes on the serial line without a
     * newline: start READY on a fresh line so the host's line parser sees it. */
    write_all(chan, "\n", 1);
    send_line("READY", NULL);

    static char cmdline[8192];
    int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, cmdline, sizeof cmdline - 1);
    if (n < 0)
        fail_spawn("/proc/cmdline", strerror(errno));
    cmdline[n] = '\0';
    if (fd >= 0)
        close(fd);

    const char *err = NULL;
    char *request = cmdline;
    if (cmdline_flag(cmdline, "cellos.pool=1")) {
        /* A pool guest: everything that does not depend on the request is done now; the
         * request arrives on the channel when a cell claims this guest. */
        const char *why = setup_cgroup_base();
        if (why)
            fail_spawn("cgroup", why);
        send_line("IDLE", NULL);
        request = read_request();
        /* READY again, for the cell that claimed this guest: its host side starts reading
         * here, and sends the secrets (if the request says some follow) once it sees it. */
        send_line("READY", NULL);
    }
    size_t argc = 0, nart = 0;
    char *text = cmdline_param(request, "cellos.argv", &err);
    if (!text || err)
        fail_spawn("cellos.argv", err ? err : "missing");
    struct json j = {text, text + strlen(text), NULL};
    char **argv = json_string_array(&j, &argc);
    if (!argv || argc == 0)
        fail_spawn("cellos.argv", argv ? "empty array" : j.err);

    static char *empty_env[] = {NULL};
    char **envp = empty_env;
    if ((text = cmdline_param(request, "cellos.env", &err)) != NULL || err) {
        if (err)
            fail_spawn("cellos.env", err);
        j = (struct json){text, text + strlen(text), NULL};
        if (!(envp = json_env_object(&j)))
            fail_spawn("cellos.env", j.err);
    }

    char **arts = NULL;
    if ((text = cmdline_param(request, "cellos.artifacts", &err)) != NULL || err) {
        if (err)
            fail_spawn("cellos.artifacts", err);
        j = (struct json){text, text + strlen(text), NULL};
        if (!(arts = json_string_array(&j, &nart)))
            fail_spawn("cellos.artifacts", j.err);
        for (size_t i = 0; i < nart; i++)
            if (arts[i][0] != '/' || strlen(arts[i]) >= MAX_ART_PATH)
                fail_spawn("cellos.artifacts", "paths must be absolute and < 1024 bytes");
    }

    /* A pool guest (perhaps restored from a snapshot, which every restored guest shares):
     * fresh randomness from the host, mixed in and the kernel's CRNG reseeded at once, and
     * the host's clock (a restored guest's clock is the snapshot's). */
    size_t seedlen = 0;
    const char *seed_tok = NULL;
    if (request != cmdline && (seed_tok = strstr(request, "cellos.seed=")) != NULL) {
        const char *end = strchrnul(seed_tok, ' ');
        char *seed = b64url_decode(seed_tok + 12, (size_t)(end - seed_tok - 12), &seedlen);
        if (!seed || seedlen < 16 || seedlen > 512)
            fail_spawn("cellos.seed", "must be 16 to 512 bytes of base64url");
        struct {
            struct rand_pool_info info;
            unsigned char buf[512];
        } entropy;
        entropy.info.entropy_count = (int)(seedlen * 8);
        entropy.info.buf_size = (int)seedlen;
        memcpy(entropy.buf, seed, seedlen);
        int rfd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
        if (rfd < 0 || ioctl(rfd, RNDADDENTROPY, &entropy) < 0 || ioctl(rfd, RNDRESEEDCRNG) < 0)
            fail_spawn("cellos.seed", strerror(errno));
        close(rfd);
        memset(&entropy, 0, sizeof entropy);
        memset(seed, 0, seedlen);
        free(seed);
    }
    if ((text = cmdline_param(request, "cellos.time", &err)) != NULL || err) {
        if (err)
            fail_spawn("cellos.time", err);
        char *endp;
        unsigned long long ns = strtoull(text, &endp, 10);
        struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ULL),
                              .tv_nsec = (long)(ns % 1000000000ULL)};
        if (*endp || clock_settime(CLOCK_REALTIME, &ts) < 0)
            fail_spawn("cellos.time", *endp ? "not a number of nanoseconds" : strerror(errno));
    }
    if ((text = cmdline_param(request, "cellos.hostname", &err)) != NULL || err) {
        if (err)
            fail_spawn("cellos.hostname", err);
        if (sethostname(text, strlen(text)) < 0)
            fail_spawn("cellos.hostname", strerror(errno));
    }
    if ((text = cmdline_param(request, "cellos.workdir", &err)) != NULL || err) {
        if (err)
            fail_spawn("cellos.workdir", err);
        workdir = text;
    }
    const char *why = make_workdir(workdir);
    if (why)
        fail_spawn("cellos.workdir", why);

    char **settings = NULL;
    if ((text = cmdline_param(request, "cellos.cgroup", &err)) != NULL || err) {
        if (err)
            fail_spawn("cellos.cgroup", err);
        j = (struct json){text, text + strlen(text), NULL};
        if (!(settings = json_env_object(&j)))
            fail_spawn("cellos.cgroup", j.err);
    }
    if ((text = cmdline_param(request, "cellos.secretlease", &err)) != NULL || err) {
        if (err)
            fail_spawn("cellos.secretlease", err);
        secret_lease = strtol(text, NULL, 10);
        if (secret_lease < 1)
            fail_spawn("cellos.secretlease", "must be a positive number of seconds");
    }
    if ((text = cmdline_param(request, "cellos.net", &err)) != NULL || err) {
        if (err)
            fail_spawn("cellos.net", err);
        j = (struct json){text, text + strlen(text), NULL};
        char **net = json_env_object(&j);
        if (!net)
            fail_spawn("cellos.net", j.err);
        if ((why = setup_network(net)) != NULL)
            fail_spawn("cellos.net", why);
    }
    if ((text = cmdline_param(request, "cellos.secrets", &err)) != NULL || err) {
        if (err)
            fail_spawn("cellos.secrets", err);
        if ((why = receive_secrets()) != NULL)
            fail_spawn("cellos.secrets", why);
    }
    /* Always: the counters explain an OOM kill even without a declared limit. */
    if ((why = setup_cgroup(settings)) != NULL)
        fail_spawn("cellos.cgroup", why);
    use_cgroup = 1;

    int code = run_workload(argv, envp);
    for (size_t i = 0; i < nart; i++)
        send_artifact(arts[i]);
    finish(code);
}
