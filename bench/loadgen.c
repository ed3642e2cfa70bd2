/* The C load generator of bench/fanout.py: the same protocol, CLI (plus
 * --token) and output files as its Python `loadgen` (the reference), for a
 * third to a half of its CPU per event, which this 2-core box needs elsewhere.
 *
 * One epoll loop over non-blocking sockets; a minimal RFC 6455 client (fixed
 * key, no extensions); the server's JSON is walked, not parsed: only the
 * fields the tally needs are read, every other value is skipped whole, so a
 * "seq" or "type" nested in a message or chunk cannot be mistaken for the
 * event's own. */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { GATE = 64, STARTING = 32, RBUF = 256 * 1024, MAX_ERRORS = 20, MAX_EVENTS = 1024 };
#define TIMEOUT_NS 60000000000LL /* as the Python loadgen's wait_for(…, 60) */
#define TAIL_NS 200000000LL      /* it sleeps 0.2 s past t1 before writing */
#define NEVER (INT64_C(1) << 62)
#define STDIN_TAG UINT64_MAX

typedef struct { char *p; size_t len, cap; } buf;
typedef struct { const char *p; size_t len; } str; /* raw JSON string content; p NULL: absent or null */

enum state { IDLE, CONNECTING, HANDSHAKE, SUBSCRIBING, OPEN, CLOSED };
enum start { PENDING, STARTED, FAILED }; /* the Python `started` future */

struct conn {
    int fd, session;
    enum state state;
    enum start started;
    bool starting; /* our "go" send awaits its ack (holds one of the STARTING slots) */
    bool close_sent;
    int msg_op;    /* opcode of the fragmented message being assembled, 0: none */
    int64_t last;  /* last seq seen on this socket */
    int64_t deadline;
    buf in, msg, out; /* bytes not parsed yet, fragments so far, bytes not sent yet */
    size_t out_off;
};

static struct {
    const char *url, *out, *token, *compression;
    int first, count, subs, active;
    long long tokens;
    bool start_turns;
} opt = {.subs = 2, .active = -1, .compression = "none"};

static struct {
    int64_t t0, t1;
    long long events, tokens, gaps, duplicates;
    int closed, n_errors;
    char *errors[MAX_ERRORS]; /* JSON string contents */
    int64_t *lat_us; int32_t *at_ms; size_t n_lat, cap_lat;
} tally = {.t0 = NEVER, .t1 = NEVER};

static struct conn *conns;
static int total, next_open, opening, n_subscribed, *order; /* order: by completed subscription */
static int *starters, n_starters, next_start, n_starting;
static int ep;
static struct addrinfo *addr;
static char host[256], path[1024], stdin_line[256];
static size_t stdin_len;
static bool went;
static int64_t end_at;
static uint64_t rng_state;
static char rbuf[RBUF];

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.monotonic_ns(): what the deltas were written with */
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t floor_div(int64_t a, int64_t b) { return a / b - (a % b != 0 && (a < 0) != (b < 0)); }

static void *xrealloc(void *p, size_t n) {
    p = realloc(p, n);
    if (!p) die("out of memory");
    return p;
}

static void buf_add(buf *b, const void *data, size_t n) {
    if (b->len + n > b->cap) {
        b->cap = b->cap * 2 > b->len + n ? b->cap * 2 : b->len + n + 4096;
        b->p = xrealloc(b->p, b->cap);
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void add_error(const char *fmt, ...) {
    if (tally.n_errors >= MAX_ERRORS) return; /* the summary keeps the first 20 */
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    tally.errors[tally.n_errors++] = strdup(text);
}

/* ------------------------------------------------------------------ JSON walking */

typedef const char *(*field_fn)(void *ctx, str key, const char *v, const char *e);

static const char *ws(const char *p, const char *e) {
    while (p < e && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) p++;
    return p;
}

static const char *string_end(const char *p, const char *e) { /* p at the opening quote */
    for (p++; p < e; p++) {
        if (*p == '\\') p++;
        else if (*p == '"') return p + 1;
    }
    return NULL;
}

static const char *skip_value(const char *p, const char *e) {
    if (p >= e) return NULL;
    if (*p == '"') return string_end(p, e);
    if (*p == '{' || *p == '[') {
        int depth = 0;
        for (; p < e; p++) {
            if (*p == '"') {
                if (!(p = string_end(p, e))) return NULL;
                p--;
            } else if (*p == '{' || *p == '[') depth++;
            else if ((*p == '}' || *p == ']') && --depth == 0) return p + 1;
        }
        return NULL;
    }
    while (p < e && *p != ',' && *p != '}' && *p != ']' && *p != ' ') p++;
    return p;
}

static const char *string_value(const char *p, const char *e, str *s) { /* a string, or null */
    if (p < e && *p == '"') {
        const char *end = string_end(p, e);
        if (end) *s = (str){p + 1, (size_t)(end - 1 - (p + 1))};
        return end;
    }
    *s = (str){NULL, 0};
    return skip_value(p, e);
}

static bool is(str s, const char *lit) { return s.p && s.len == strlen(lit) && memcmp(s.p, lit, s.len) == 0; }

static const char *object(const char *p, const char *e, field_fn field, void *ctx) {
    p = ws(p, e);
    if (p >= e || *p != '{') return NULL;
    p = ws(p + 1, e);
    if (p < e && *p == '}') return p + 1;
    for (;;) {
        if (p >= e || *p != '"') return NULL;
        const char *key_end = string_end(p, e);
        if (!key_end) return NULL;
        str key = {p + 1, (size_t)(key_end - 1 - (p + 1))};
        p = ws(key_end, e);
        if (p >= e || *p != ':') return NULL;
        if (!(p = field(ctx, key, ws(p + 1, e), e))) return NULL;
        p = ws(p, e);
        if (p >= e) return NULL;
        if (*p == '}') return p + 1;
        if (*p != ',') return NULL;
        p = ws(p + 1, e);
    }
}

struct event { bool has_seq, text_delta; int64_t seq; str delta; };

static const char *chunk_field(void *ctx, str key, const char *v, const char *e) {
    struct event *ev = ctx;
    str s;
    if (is(key, "type")) {
        v = string_value(v, e, &s);
        ev->text_delta = is(s, "text-delta");
        return v;
    }
    if (is(key, "delta")) return string_value(v, e, &ev->delta);
    return skip_value(v, e);
}

static const char *event_field(void *ctx, str key, const char *v, const char *e) {
    struct event *ev = ctx;
    if (is(key, "seq")) {
        int64_t n = 0;
        const char *p = v;
        while (p < e && *p >= '0' && *p <= '9') n = n * 10 + (*p++ - '0');
        if (p == v) return NULL;
        ev->seq = n;
        ev->has_seq = true;
        return p;
    }
    if (is(key, "chunk") && v < e && *v == '{') return object(v, e, chunk_field, ev);
    return skip_value(v, e);
}

static bool parse_int(str s, int64_t *out) { /* as Python's int(): surrounding blanks allowed */
    const char *p = s.p, *e = s.p + s.len;
    while (p < e && *p == ' ') p++;
    bool neg = p < e && *p == '-';
    if (neg || (p < e && *p == '+')) p++;
    const char *digits = p;
    int64_t n = 0;
    while (p < e && *p >= '0' && *p <= '9') n = n * 10 + (*p++ - '0');
    if (p == digits) return false;
    while (p < e && *p == ' ') p++;
    *out = neg ? -n : n;
    return p == e;
}

static void tally_event(struct conn *c, const struct event *ev, int64_t now) {
    if (c->last && ev->seq != c->last + 1) {
        if (ev->seq <= c->last) {
            tally.duplicates++;
            return;
        }
        tally.gaps += ev->seq - c->last - 1;
    }
    c->last = ev->seq;
    if (!(tally.t0 <= now && now < tally.t1)) return;
    tally.events++;
    int64_t sent;
    if (!ev->text_delta || !ev->delta.p) return;
    if (!parse_int(ev->delta, &sent)) {
        add_error("bad delta");
        return;
    }
    if (tally.n_lat == tally.cap_lat) {
        tally.cap_lat = tally.cap_lat ? tally.cap_lat * 2 : 1 << 16;
        tally.lat_us = xrealloc(tally.lat_us, tally.cap_lat * sizeof *tally.lat_us);
        tally.at_ms = xrealloc(tally.at_ms, tally.cap_lat * sizeof *tally.at_ms);
    }
    tally.tokens++;
    tally.lat_us[tally.n_lat] = floor_div(now - sent, 1000);
    tally.at_ms[tally.n_lat++] = (int32_t)floor_div(now - tally.t0, 1000000);
}

struct frame { struct conn *c; int64_t now; bool events; str op, id, code, message; };

static const char *one_event(struct frame *f, const char *v, const char *e) {
    struct event ev = {0};
    v = object(v, e, event_field, &ev);
    if (v && !ev.has_seq) return NULL;
    if (v) tally_event(f->c, &ev, f->now);
    return v;
}

static const char *frame_field(void *ctx, str key, const char *v, const char *e) {
    struct frame *f = ctx;
    if (is(key, "op")) return string_value(v, e, &f->op);
    if (is(key, "id")) return string_value(v, e, &f->id); /* a number is not "sub" or "go" either */
    if (is(key, "code")) return string_value(v, e, &f->code);
    if (is(key, "message")) return string_value(v, e, &f->message);
    if (is(key, "event") && v < e && *v == '{') {
        f->events = true;
        return one_event(f, v, e);
    }
    if (is(key, "events") && v < e && *v == '[') {
        f->events = true;
        v = ws(v + 1, e);
        if (v < e && *v == ']') return v + 1;
        for (;;) {
            if (!(v = one_event(f, v, e))) return NULL;
            v = ws(v, e);
            if (v < e && *v == ']') return v + 1;
            if (v >= e || *v != ',') return NULL;
            v = ws(v + 1, e);
        }
    }
    return skip_value(v, e);
}

/* ------------------------------------------------------------------ sockets */

static void start_done(struct conn *c);

static void conn_lost(struct conn *c, int err) {
    if (c->state < OPEN) /* as a failed open_one: the Python loadgen dies too */
        die("socket for fan-%d lost before it subscribed: %s", c->session, err ? strerror(err) : "closed");
    tally.closed++;
    if (err) add_error("closed: OSError(%d, '%s')", err, strerror(err));
    else add_error("closed: None");
    if (c->started == PENDING) c->started = FAILED;
    close(c->fd);
    c->state = CLOSED;
    c->in.len = c->msg.len = c->out.len = c->out_off = 0;
    start_done(c);
}

static void flush(struct conn *c) {
    while (c->out_off < c->out.len) {
        ssize_t n = send(c->fd, c->out.p + c->out_off, c->out.len - c->out_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) break;
            conn_lost(c, errno);
            return;
        }
        c->out_off += (size_t)n;
    }
    if (c->out_off == c->out.len) c->out.len = c->out_off = 0; /* else EPOLLOUT comes when there is room */
}

static void send_frame(struct conn *c, int op, const char *data, size_t len) {
    uint8_t h[14];
    size_t n = 0;
    h[n++] = (uint8_t)(0x80 | op);
    if (len < 126) h[n++] = (uint8_t)(0x80 | len);
    else if (len < 65536) {
        h[n++] = 0x80 | 126;
        h[n++] = (uint8_t)(len >> 8);
        h[n++] = (uint8_t)len;
    } else {
        h[n++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--) h[n++] = (uint8_t)((uint64_t)len >> (8 * i));
    }
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    const uint8_t *mask = h + n;
    memcpy(h + n, &rng_state, 4);
    n += 4;
    buf_add(&c->out, h, n);
    size_t at = c->out.len;
    buf_add(&c->out, data, len);
    for (size_t i = 0; i < len; i++) c->out.p[at + i] ^= (char)mask[i & 3];
    flush(c);
}

static void send_text(struct conn *c, const char *fmt, ...) {
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    send_frame(c, 0x1, text, (size_t)n);
}

static void open_next(int64_t now) {
    while (opening < GATE && next_open < total) {
        struct conn *c = &conns[next_open];
        c->fd = socket(addr->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, addr->ai_protocol);
        if (c->fd < 0) die("socket: %s", strerror(errno));
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(c->fd, addr->ai_addr, addr->ai_addrlen) < 0 && errno != EINPROGRESS)
            die("connect: %s", strerror(errno));
        /* Edge-triggered, so that epoll does not poll every ready socket again at each
         * wait; hence a read that fills the buffer is followed by another. */
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.u64 = (uint64_t)next_open};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
        c->state = CONNECTING;
        c->deadline = now + TIMEOUT_NS;
        next_open++;
        opening++;
    }
}

static void connected(struct conn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) die("connect to %s: %s", opt.url, strerror(err));
    char req[4096];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                     "Authorization: Bearer %s\r\nUser-Agent: turnline-bench-loadgen\r\n\r\n",
                     path, host, opt.token);
    if (n >= (int)sizeof req) die("token too long");
    c->state = HANDSHAKE;
    buf_add(&c->out, req, (size_t)n);
    flush(c);
}

static void print_subscribed(void) {
    printf("{\"state\": \"subscribed\", \"sockets\": %d}\n", n_subscribed);
    fflush(stdout);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = STDIN_TAG};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev) < 0) die("epoll_ctl stdin: %s", strerror(errno));
}

static void subscribed(struct conn *c, int64_t now) {
    c->state = OPEN;
    order[n_subscribed++] = (int)(c - conns);
    opening--;
    open_next(now);
    if (n_subscribed == total) print_subscribed();
}

static void start_next(int64_t now) {
    while (n_starting < STARTING && next_start < n_starters) {
        struct conn *c = &conns[starters[next_start++]];
        if (c->state == CLOSED) continue; /* already counted as a failed start */
        c->starting = true;
        c->deadline = now + TIMEOUT_NS;
        n_starting++;
        send_text(c, "{\"op\":\"send\",\"session\":\"fan-%d\",\"id\":\"go\",\"messages\":"
                     "[{\"parts\":[{\"type\":\"text\",\"text\":\"%lld\"}]}]}", c->session, opt.tokens);
    }
}

static void start_done(struct conn *c) {
    if (!c->starting) return;
    c->starting = false;
    n_starting--;
    start_next(mono_ns());
}

static void message(struct conn *c, const char *p, size_t len, int64_t now) {
    struct frame f = {.c = c, .now = now};
    if (!object(p, p + len, frame_field, &f)) {
        add_error("bad frame");
        return;
    }
    if (f.events) return;
    bool sub = is(f.id, "sub"), go = is(f.id, "go");
    if (is(f.op, "error")) {
        add_error("%.*s: %.*s", f.code.p ? (int)f.code.len : 4, f.code.p ? f.code.p : "None",
                  f.message.p ? (int)f.message.len : 4, f.message.p ? f.message.p : "None");
        if (sub && c->state == SUBSCRIBING)
            die("subscribe to fan-%d failed: %.*s", c->session, (int)f.message.len, f.message.p ? f.message.p : "");
        if (go && c->started == PENDING) {
            c->started = FAILED;
            start_done(c);
        }
    } else if (is(f.op, "ack")) {
        if (sub && c->state == SUBSCRIBING) subscribed(c, now);
        if (go && c->started == PENDING) {
            c->started = STARTED;
            start_done(c);
        }
    }
}

static void ws_frame(struct conn *c, bool fin, int op, const char *payload, size_t len, int64_t now) {
    switch (op) {
    case 0x9: /* ping */
        send_frame(c, 0xA, payload, len);
        break;
    case 0x8: /* close: echo its code, then the server closes the TCP connection */
        if (!c->close_sent) {
            c->close_sent = true;
            send_frame(c, 0x8, payload, len >= 2 ? 2 : 0);
        }
        break;
    case 0x1:
    case 0x2:
        if (fin) {
            if (op == 0x1) message(c, payload, len, now);
        } else {
            c->msg.len = 0;
            buf_add(&c->msg, payload, len);
            c->msg_op = op;
        }
        break;
    case 0x0:
        if (!c->msg_op) break;
        buf_add(&c->msg, payload, len);
        if (fin) {
            if (c->msg_op == 0x1) message(c, c->msg.p, c->msg.len, now);
            c->msg_op = 0;
            c->msg.len = 0;
        }
        break;
    }
}

/* Parses what it can of p[0:len] (handshake response, then whole frames);
 * returns how many bytes it used, the rest waits for more. */
static size_t consume(struct conn *c, char *p, size_t len, int64_t now) {
    size_t at = 0;
    if (c->state == HANDSHAKE) {
        const char *end = memmem(p, len, "\r\n\r\n", 4);
        if (!end) {
            if (len > 65536) die("handshake response too long");
            return 0;
        }
        if (len < 12 || memcmp(p, "HTTP/1.1 101", 12) != 0)
            die("handshake refused: %.*s", (int)((char *)memchr(p, '\r', len) - p), p);
        at = (size_t)(end + 4 - p);
        c->state = SUBSCRIBING;
        c->deadline = now + TIMEOUT_NS;
        send_text(c, "{\"op\":\"subscribe\",\"session\":\"fan-%d\",\"after\":0,\"id\":\"sub\"}", c->session);
    }
    while (len - at >= 2 && c->state != CLOSED) {
        uint8_t *h = (uint8_t *)p + at;
        size_t avail = len - at, hdr = 2;
        uint64_t n = h[1] & 0x7f;
        if (n == 126) {
            if (avail < 4) break;
            n = (uint64_t)h[2] << 8 | h[3];
            hdr = 4;
        } else if (n == 127) {
            if (avail < 10) break;
            n = 0;
            for (int i = 2; i < 10; i++) n = n << 8 | h[i];
            hdr = 10;
        }
        bool masked = h[1] & 0x80; /* servers must not mask; unmask anyway */
        if (masked) hdr += 4;
        if (avail < hdr || avail - hdr < n) break;
        char *payload = p + at + hdr;
        if (masked)
            for (uint64_t i = 0; i < n; i++) payload[i] ^= (char)h[hdr - 4 + (i & 3)];
        ws_frame(c, h[0] & 0x80, h[0] & 0x0f, payload, (size_t)n, now);
        at += hdr + (size_t)n;
    }
    return at;
}

static void received(struct conn *c, size_t n) {
    int64_t now = mono_ns(); /* one receive time per read, as the Python one per data_received */
    char *p = rbuf;
    size_t len = n;
    if (c->in.len) { /* a frame split across reads */
        buf_add(&c->in, rbuf, len);
        p = c->in.p;
        len = c->in.len;
    }
    size_t used = consume(c, p, len, now);
    if (c->state == CLOSED) return;
    if (p == c->in.p) {
        memmove(c->in.p, c->in.p + used, len - used);
        c->in.len = len - used;
    } else if (used < len) buf_add(&c->in, p + used, len - used);
}

static void readable(struct conn *c) {
    for (;;) {
        ssize_t n = recv(c->fd, rbuf, RBUF, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        if (n <= 0) {
            conn_lost(c, n ? errno : 0);
            return;
        }
        received(c, (size_t)n);
        if (n < RBUF || c->state == CLOSED) return; /* a short read emptied the socket */
    }
}

/* ------------------------------------------------------------------ the run */

static void go(int64_t now) {
    went = true;
    if (!opt.start_turns) return;
    /* One starter per session: the first of its sockets to have subscribed. */
    char *has = calloc((size_t)opt.count + 1, 1);
    starters = calloc((size_t)opt.count + 1, sizeof *starters);
    if (!has || !starters) die("out of memory");
    for (int i = 0; i < n_subscribed; i++) {
        int s = conns[order[i]].session - opt.first;
        if (has[s] || (opt.active >= 0 && n_starters >= opt.active)) continue;
        has[s] = 1;
        starters[n_starters++] = order[i];
    }
    start_next(now);
}

static void read_stdin(int64_t now) {
    ssize_t n = read(0, stdin_line + stdin_len, sizeof stdin_line - 1 - stdin_len);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) die("stdin closed before go");
    stdin_len += (size_t)n;
    stdin_line[stdin_len] = 0;
    if (!strchr(stdin_line, '\n')) {
        if (stdin_len == sizeof stdin_line - 1) die("bad line on stdin");
        return;
    }
    long long t0, t1;
    if (sscanf(stdin_line, "go %lld %lld", &t0, &t1) != 2) die("expected 'go T0 T1', got: %s", stdin_line);
    tally.t0 = t0;
    tally.t1 = t1;
    epoll_ctl(ep, EPOLL_CTL_DEL, 0, NULL);
    go(now);
}

static void write_json_string(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') fprintf(f, "\\%c", *s);
        else if ((unsigned char)*s < 0x20) fprintf(f, "\\u%04x", *s);
        else fputc(*s, f);
    }
    fputc('"', f);
}

static void write_array(const char *path_, const void *data, size_t size, size_t n) {
    FILE *f = fopen(path_, "wb");
    if (!f || fwrite(data, size, n, f) != n || fclose(f)) die("cannot write %s: %s", path_, strerror(errno));
}

static void finish(void) {
    char lat[4096], at[4096];
    snprintf(lat, sizeof lat, "%s.lat", opt.out);
    snprintf(at, sizeof at, "%s.at", opt.out);
    /* native int64 / int32 arrays, as array("q") / array("i").tofile */
    write_array(lat, tally.lat_us, sizeof *tally.lat_us, tally.n_lat);
    write_array(at, tally.at_ms, sizeof *tally.at_ms, tally.n_lat);
    int failed = 0;
    for (int i = 0; i < n_subscribed; i++) failed += conns[order[i]].started == FAILED;
    FILE *f = fopen(opt.out, "w");
    if (!f) die("cannot write %s: %s", opt.out, strerror(errno));
    fprintf(f, "{\"sockets\": %d, \"events\": %lld, \"tokens\": %lld, \"gaps\": %lld, \"duplicates\": %lld, "
               "\"closed\": %d, \"errors\": [", n_subscribed, tally.events, tally.tokens, tally.gaps,
            tally.duplicates, tally.closed);
    for (int i = 0; i < tally.n_errors; i++) /* already JSON string contents (raw from frames) */
        fprintf(f, "%s\"%s\"", i ? ", " : "", tally.errors[i]);
    fprintf(f, "], \"failed_starts\": %d, \"latency_file\": ", failed);
    write_json_string(f, lat);
    fputc('}', f);
    if (fclose(f)) die("cannot write %s: %s", opt.out, strerror(errno));
    printf("{\"state\": \"done\"}\n");
    fflush(stdout);
    _exit(0); /* closing thousands of sockets politely takes longer than the run */
}

static void timers(int64_t now) {
    static int64_t next_scan;
    if (now >= next_scan) {
        next_scan = now + 100000000;
        for (int i = 0; n_subscribed < total && i < next_open; i++)
            if (conns[i].state < OPEN && now > conns[i].deadline)
                die("fan-%d: no %s within 60 s", conns[i].session,
                    conns[i].state == SUBSCRIBING ? "subscribe ack" : "handshake");
        for (int i = 0; i < next_start; i++) /* as wait_for(started, 60): give the slot back */
            if (conns[starters[i]].starting && now > conns[starters[i]].deadline) start_done(&conns[starters[i]]);
    }
    if (went && !end_at && next_start == n_starters && n_starting == 0)
        end_at = (now > tally.t1 ? now : tally.t1) + TAIL_NS;
    if (end_at && now >= end_at) finish();
}

static void parse_url(void) {
    const char *u = opt.url;
    if (strncmp(u, "wss://", 6) == 0) die("wss:// is not supported");
    if (strncmp(u, "ws://", 5) != 0) die("--url must be ws://HOST:PORT/PATH");
    u += 5;
    size_t hl = strcspn(u, "/");
    if (hl >= sizeof host) die("host too long");
    memcpy(host, u, hl);
    snprintf(path, sizeof path, "%s", u[hl] ? u + hl : "/");
    char name[256], *colon = strrchr(host, ':');
    const char *port = colon ? colon + 1 : "80";
    snprintf(name, sizeof name, "%.*s", colon ? (int)(colon - host) : (int)hl, host);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM};
    int rc = getaddrinfo(name, port, &hints, &addr);
    if (rc) die("%s: %s", name, gai_strerror(rc));
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        char *a = argv[i], *v = strchr(a, '=');
        if (strcmp(a, "--start-turns") == 0) {
            opt.start_turns = true;
            continue;
        }
        if (v) *v++ = 0;
        else if (i + 1 < argc) v = argv[++i];
        else die("%s needs a value", a);
        if (strcmp(a, "--url") == 0) opt.url = v;
        else if (strcmp(a, "--out") == 0) opt.out = v;
        else if (strcmp(a, "--token") == 0) opt.token = v;
        else if (strcmp(a, "--compression") == 0) opt.compression = v;
        else if (strcmp(a, "--first") == 0) opt.first = atoi(v);
        else if (strcmp(a, "--count") == 0) opt.count = atoi(v);
        else if (strcmp(a, "--subs") == 0) opt.subs = atoi(v);
        else if (strcmp(a, "--tokens") == 0) opt.tokens = atoll(v);
        else if (strcmp(a, "--active") == 0) opt.active = atoi(v);
        else die("unknown option %s", a);
    }
    if (!opt.url || !opt.out || !opt.token || argc < 2)
        die("usage: loadgen --url ws://HOST:PORT/v1/ws --token TOKEN --first N --count N --tokens N --out FILE "
            "[--subs 2] [--compression none] [--start-turns] [--active N]");
    if (strcmp(opt.compression, "none") != 0)
        die("--compression %s: the C load generator speaks no permessage-deflate; use the Python one "
            "(bench.fanout run --loadgen python)", opt.compression);
    if (opt.count < 0 || opt.subs < 1) die("--count must be >= 0 and --subs >= 1");
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    parse_url();
    signal(SIGPIPE, SIG_IGN);
    rng_state = (uint64_t)mono_ns() ^ ((uint64_t)getpid() << 32) ^ 0x9e3779b97f4a7c15u;
    total = opt.count * opt.subs;
    conns = calloc((size_t)total + 1, sizeof *conns);
    order = calloc((size_t)total + 1, sizeof *order);
    if (!conns || !order) die("out of memory");
    for (int i = 0; i < total; i++) conns[i].session = opt.first + i / opt.subs;
    if ((ep = epoll_create1(EPOLL_CLOEXEC)) < 0) die("epoll_create1: %s", strerror(errno));
    open_next(mono_ns());
    if (total == 0) print_subscribed();
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, 100);
        if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u64 == STDIN_TAG) {
                read_stdin(mono_ns());
                continue;
            }
            struct conn *c = &conns[evs[i].data.u64];
            if (c->state == CLOSED) continue;
            if (c->state == CONNECTING) {
                if (evs[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) connected(c);
                continue;
            }
            if (evs[i].events & EPOLLOUT) flush(c);
            if (c->state != CLOSED && evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) readable(c);
        }
        timers(mono_ns());
    }
}
