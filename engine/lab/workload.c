/*
 * tug-workload: a demo process for proving that a live migration kept a
 * container's memory, progress and sockets intact.
 *
 * It is deliberately boring for CRIU: one process, one thread, anonymous
 * memory, plain files (opened once or opened/closed per write), TCP sockets,
 * poll() and signals. No timerfd, signalfd, eventfd, inotify or deleted files.
 *
 *   memory     MIB MiB of anonymous memory; page i holds a deterministic
 *              function of (i, version[i]) so every page can be re-derived
 *              and checked after a migration (SIGUSR1 -> verify.json).
 *   dirtying   --dirty-rate pages/s of the hot set are rewritten (version++)
 *              so pre-copy has something to converge against.
 *   churn      --churn-mib: every 200 ms a fresh anonymous mapping of that
 *              size replaces the previous one (mapped before the old one is
 *              unmapped, so addresses alternate and get reused), filled with
 *              pages that verify checks too: memory mapped while pre-copy runs.
 *   heartbeat  every --interval-ms a line "<counter> <realtime_ns> <mono_ns>
 *              <fnv>" goes to heartbeat.log (fnv: FNV-1a 64 of the three fields
 *              as written, in hex: a torn or altered record is seen); gaps in
 *              realtime measure downtime, counter steps prove the process
 *              continued rather than restarted.
 *   status     status.json about every 100 ms (atomic rename).
 *   TCP        GET/BULK/SUM line protocol to prove established connections
 *              survive (see handle_line()).
 *   pod        --pod-ipc KEY --pod-slot N: a SysV semaphore set and a SysV
 *              shared memory segment by key, shared by a pod's members through
 *              their IPC namespace; each sets its semaphore to its counter
 *              (mod 32768) and writes its counter into its slot of the
 *              segment, and watches the others' in both.
 *              --pod-peer PORT: a connection over the pod's loopback to
 *              127.0.0.1:PORT, a GET every 50 ms (a member to its holder).
 *              verify.json says whether both still work.
 *
 * Build: gcc -O2 -Wall -Wextra -static -o tug-workload workload.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE_BYTES 4096u
#define PAGE_WORDS (PAGE_BYTES / 8u)
#define NS_PER_S 1000000000LL
#define NS_PER_MS 1000000LL
#define STATUS_PERIOD_NS (100 * NS_PER_MS)
/* Dirty work is batched at least this far apart so high rates don't spin. */
#define DIRTY_MIN_STEP_NS (1 * NS_PER_MS)
/* After a freeze (SIGSTOP, checkpoint) at most this much backlog is caught up. */
#define DIRTY_BACKLOG_NS (100 * NS_PER_MS)
#define MAX_CLIENTS 64
#define IN_CAP 16384u
#define OUT_CAP 65536u
/* Room kept free in the output buffer before another reply line is made. */
#define OUT_RESERVE 256u
#define MAX_ID_LEN 128u
#define GOLDEN 0x9E3779B97F4A7C15ULL
#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

/* ---- configuration ---------------------------------------------------- */

static uint64_t opt_memory_mib = 64;
static uint64_t opt_dirty_rate = 0;
static double opt_hot_set = 1.0;
static const char *opt_state = "/state";
/* A file to hold a POSIX write lock on, for as long as the workload runs. */
static const char *opt_lock;
/* SysV shared memory to fill, dirty and verify (0: none). */
static uint64_t opt_sysv_shm_mib = 0;
static long opt_port = 7000;
/* A pod: the SysV key of the members' shared semaphores (0: none), this member's
 * slot in them, and the port of a pod peer to keep a loopback connection to (0: none). */
static long opt_pod_ipc_key = 0;
static long opt_pod_slot = 0;
static long opt_pod_peer = 0;
static int opt_pod_shm = 1; /* attach the pod's segment */
static int64_t opt_interval_ms = 10;
static uint64_t opt_churn_mib = 0;
#define CHURN_PERIOD_NS (200 * NS_PER_MS)
/* Page numbers of the churn mapping in page_seed(), apart from the main block's. */
#define CHURN_FIRST_PAGE (1ULL << 30)

/* ---- state ------------------------------------------------------------ */

static volatile sig_atomic_t g_stop;
static volatile sig_atomic_t g_verify;

static uint64_t *g_block;      /* npages * PAGE_WORDS words */
static uint32_t *g_version;    /* npages entries */
static uint64_t g_pages;
static uint64_t g_hot_pages;
static uint64_t g_dirtied_total;
static uint64_t g_rng = 0x853c49e6748fea9bULL;
static uint64_t *g_churn;      /* the current churn mapping, g_churn_pages pages */
static uint64_t g_churn_pages;
static uint32_t g_churn_gen;

static uint64_t g_counter;
static uint64_t g_verify_seq;
static int64_t g_started_realtime_ns;
static int g_hb_fd = -1;

static char g_hb_path[4096];
static char g_status_path[4096];
static char g_status_tmp[4096];
static char g_verify_path[4096];
static char g_verify_tmp[4096];

/* ---- small helpers ---------------------------------------------------- */

static int64_t clock_ns(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

static int64_t mono_ns(void) { return clock_ns(CLOCK_MONOTONIC); }
static int64_t real_ns(void) { return clock_ns(CLOCK_REALTIME); }

/* splitmix64 finaliser */
static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* xorshift64*: used both for choosing pages and for the BULK stream. */
static inline uint64_t xorshift64s(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static inline uint64_t page_seed(uint64_t i, uint32_t v)
{
    return mix64((i << 32) | (uint64_t)v);
}

/* Word w of page i at version v is splitmix64 step w+1 from page_seed(i, v). */
static void fill_page(uint64_t *p, uint64_t i, uint32_t v)
{
    uint64_t s = page_seed(i, v);
    for (unsigned w = 0; w < PAGE_WORDS; w++) {
        s += GOLDEN;
        p[w] = mix64(s);
    }
}

static int page_ok(const uint64_t *p, uint64_t i, uint32_t v)
{
    uint64_t s = page_seed(i, v);
    uint64_t diff = 0;
    for (unsigned w = 0; w < PAGE_WORDS; w++) {
        s += GOLDEN;
        diff |= p[w] ^ mix64(s);
    }
    return diff == 0;
}

static int parse_u64(const char *s, uint64_t *out)
{
    uint64_t v = 0;
    if (*s == '\0')
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        uint64_t d = (uint64_t)(*s - '0');
        if (v > (UINT64_MAX - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    *out = v;
    return 0;
}

/* Write a whole buffer to path via path.tmp + rename so readers never see
 * half a file. Failures are reported once per kind and otherwise ignored:
 * a full disk must not kill the workload being migrated. */
static void write_atomic(const char *path, const char *tmp, const char *buf, size_t len)
{
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    size_t off = 0;
    while (off < len) {
        ssize_t n = write(fd, buf + off, len - off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            close(fd);
            unlink(tmp);
            return;
        }
        off += (size_t)n;
    }
    close(fd);
    if (rename(tmp, path) < 0)
        unlink(tmp);
}

/* ---- workload pieces -------------------------------------------------- */

static void write_status(void)
{
    char buf[1024];
    int n = snprintf(buf, sizeof buf,
                     "{\"pid\":%d,\"counter\":%llu,\"realtime_ns\":%lld,"
                     "\"memory_mib\":%llu,\"pages\":%llu,\"hot_pages\":%llu,"
                     "\"dirty_rate\":%llu,\"dirtied_total\":%llu,"
                     "\"block_addr\":\"0x%llx\",\"started_realtime_ns\":%lld,"
                     "\"verify_seq\":%llu,\"interval_ms\":%lld,\"port\":%ld}\n",
                     (int)getpid(), (unsigned long long)g_counter, (long long)real_ns(),
                     (unsigned long long)opt_memory_mib, (unsigned long long)g_pages,
                     (unsigned long long)g_hot_pages, (unsigned long long)opt_dirty_rate,
                     (unsigned long long)g_dirtied_total,
                     (unsigned long long)(uintptr_t)g_block, (long long)g_started_realtime_ns,
                     (unsigned long long)g_verify_seq, (long long)opt_interval_ms, opt_port);
    if (n > 0 && (size_t)n < sizeof buf)
        write_atomic(g_status_path, g_status_tmp, buf, (size_t)n);
}

/* The SysV segment: its id (the first in a fresh IPC namespace is 0), pages
 * filled like the anonymous block but from their own seeds, and versions. */
#define SHM_SEED_BASE (1ULL << 31)
static int g_shm_id = -1;
static uint64_t *g_shm;
static uint64_t g_shm_pages;
static uint32_t *g_shm_version;

/* Is the segment still there under its id, and does it hold what was written? */
static int shm_check(uint64_t *bad)
{
    struct shmid_ds ds;
    if (!g_shm_pages)
        return 1;
    int same = shmctl(g_shm_id, IPC_STAT, &ds) == 0 && ds.shm_segsz == g_shm_pages * PAGE_BYTES;
    for (uint64_t j = 0; j < g_shm_pages; j++)
        if (!page_ok(g_shm + j * PAGE_WORDS, SHM_SEED_BASE + j, g_shm_version[j]))
            (*bad)++;
    return same;
}

/* ---- pod: the shared page and the loopback peer ------------------------ */

#define POD_SLOTS 64
#define PEER_PERIOD_NS (50 * NS_PER_MS)
static int g_pod_sem_id = -1;
static int g_pod_seen[POD_SLOTS];           /* the others' last value seen */
static int64_t g_pod_changed_ns[POD_SLOTS]; /* realtime of its last change */
/* The segment: one page of POD_SLOTS counters, attached by every member. */
static int g_pod_shm_id = -1;
static volatile uint64_t *g_pod_shm;
static uint64_t g_pod_shm_seen[POD_SLOTS];
static int64_t g_pod_shm_changed_ns[POD_SLOTS];

static int g_peer_fd = -1;
static int g_peer_waiting;      /* a GET sent, its reply not yet read */
static int g_peer_ever;         /* connected once: failures from then on count */
static uint64_t g_peer_seq, g_peer_replies, g_peer_errors, g_peer_reconnects;
static int64_t g_peer_last_reply_ns;
static char g_peer_in[256];
static size_t g_peer_in_len;

/* Both kinds: semaphores are only objects of the namespace, a segment is
 * also mapped into each member (CRIU maps it only in the first member's
 * restore; tug attaches it in the others': destination/sysvattach.py). */
union pod_semun {
    int val;
    unsigned short *array;
};

static void pod_start(void)
{
    if (!opt_pod_ipc_key)
        return;
    g_pod_sem_id = semget((key_t)opt_pod_ipc_key, POD_SLOTS, IPC_CREAT | 0600);
    if (g_pod_sem_id < 0) {
        fprintf(stderr, "tug-workload: pod semaphores 0x%lx: %s\n", opt_pod_ipc_key, strerror(errno));
        exit(1);
    }
    if (!opt_pod_shm)
        return;
    g_pod_shm_id = shmget((key_t)opt_pod_ipc_key, PAGE_BYTES, IPC_CREAT | 0600);
    void *at = g_pod_shm_id < 0 ? (void *)-1 : shmat(g_pod_shm_id, NULL, 0);
    if (at == (void *)-1) {
        fprintf(stderr, "tug-workload: pod segment 0x%lx: %s\n", opt_pod_ipc_key, strerror(errno));
        exit(1);
    }
    g_pod_shm = at;
}

/* Each heartbeat: our counter into our semaphore; note which others moved. */
static void pod_tick(void)
{
    if (g_pod_sem_id < 0)
        return;
    union pod_semun arg = {.val = (int)(g_counter % 32767) + 1};
    semctl(g_pod_sem_id, (int)opt_pod_slot, SETVAL, arg);
    unsigned short vals[POD_SLOTS];
    arg.array = vals;
    if (semctl(g_pod_sem_id, 0, GETALL, arg) < 0)
        return;
    int64_t now = real_ns();
    for (int k = 0; k < POD_SLOTS; k++) {
        int v = vals[k];
        if (k != opt_pod_slot && v != g_pod_seen[k]) {
            g_pod_seen[k] = v;
            g_pod_changed_ns[k] = now;
        }
    }
    if (!g_pod_shm)
        return;
    g_pod_shm[opt_pod_slot] = g_counter + 1;
    for (int k = 0; k < POD_SLOTS; k++) {
        uint64_t v = g_pod_shm[k];
        if (k != opt_pod_slot && v != g_pod_shm_seen[k]) {
            g_pod_shm_seen[k] = v;
            g_pod_shm_changed_ns[k] = now;
        }
    }
}

static void peer_fail(void)
{
    if (g_peer_fd >= 0)
        close(g_peer_fd);
    g_peer_fd = -1;
    g_peer_waiting = 0;
    g_peer_in_len = 0;
    if (g_peer_ever)
        g_peer_errors++;
}

/* Every PEER_PERIOD_NS: (re)connect if needed, then one GET if none is pending. */
static void peer_tick(void)
{
    if (!opt_pod_peer || g_peer_waiting)
        return;
    if (g_peer_fd < 0) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt_pod_peer)};
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
            if (fd >= 0)
                close(fd);
            if (g_peer_ever)
                g_peer_errors++;
            return; /* the peer may not listen yet: next tick */
        }
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        if (g_peer_ever)
            g_peer_reconnects++;
        g_peer_ever = 1;
        g_peer_fd = fd;
    }
    char req[64];
    int n = snprintf(req, sizeof req, "GET p%ld-%llu\n", opt_pod_slot, (unsigned long long)++g_peer_seq);
    if (send(g_peer_fd, req, (size_t)n, MSG_NOSIGNAL) != n) {
        peer_fail();
        return;
    }
    g_peer_waiting = 1;
}

/* The peer's reply: "<our id> <its counter>\n". */
static void peer_read(void)
{
    ssize_t r = recv(g_peer_fd, g_peer_in + g_peer_in_len, sizeof g_peer_in - 1 - g_peer_in_len, 0);
    if (r < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (r <= 0) {
        peer_fail();
        return;
    }
    g_peer_in_len += (size_t)r;
    g_peer_in[g_peer_in_len] = '\0';
    char *nl = strchr(g_peer_in, '\n');
    if (!nl) {
        if (g_peer_in_len >= sizeof g_peer_in - 1)
            peer_fail();
        return;
    }
    char want[64];
    int n = snprintf(want, sizeof want, "p%ld-%llu ", opt_pod_slot, (unsigned long long)g_peer_seq);
    if (strncmp(g_peer_in, want, (size_t)n) != 0 || nl + 1 != g_peer_in + g_peer_in_len) {
        peer_fail(); /* a wrong or extra reply: the stream is not what we sent it */
        return;
    }
    g_peer_in_len = 0;
    g_peer_waiting = 0;
    g_peer_replies++;
    g_peer_last_reply_ns = real_ns();
}

/* The other members seen in one shared object (semaphores or segment) and
 * the longest any of them has been still. A slot counts once a value was
 * seen there: its change time is set then (members never write 0). */
static int pod_peers(const int64_t *changed_ns, int64_t now, int64_t *stale)
{
    int peers = 0;
    *stale = 0;
    for (int k = 0; k < POD_SLOTS; k++) {
        if (k == opt_pod_slot || !changed_ns[k])
            continue;
        peers++;
        if (now - changed_ns[k] > *stale)
            *stale = now - changed_ns[k];
    }
    return peers;
}

/* The pod's part of verify.json (empty outside a pod). */
static int pod_report(char *buf, size_t cap)
{
    if (!opt_pod_ipc_key && !opt_pod_peer)
        return snprintf(buf, cap, "%s", "");
    int64_t now = real_ns();
    int64_t stale, shm_stale;
    int peers = pod_peers(g_pod_changed_ns, now, &stale);
    struct semid_ds ds;
    int same = g_pod_sem_id < 0 ||
               (semctl(g_pod_sem_id, 0, IPC_STAT, &ds) == 0 && ds.sem_perm.__key == (key_t)opt_pod_ipc_key);
    /* The segment: still ours (key), and every member attached to it. */
    int shm_peers = pod_peers(g_pod_shm_changed_ns, now, &shm_stale), shm_attached = 0;
    struct shmid_ds sds;
    int shm_same = g_pod_shm_id < 0 ||
                   (shmctl(g_pod_shm_id, IPC_STAT, &sds) == 0 && sds.shm_perm.__key == (key_t)opt_pod_ipc_key &&
                    (shm_attached = (int)sds.shm_nattch) > 0);
    int n = snprintf(buf, cap,
                     ",\"pod\":{\"shm_id\":%d,\"shm_same\":%s,\"shm_attached\":%d,\"shm_peers\":%d,"
                     "\"shm_stale_ms\":%lld",
                     g_pod_shm_id, shm_same ? "true" : "false", shm_attached, shm_peers,
                     (long long)(shm_stale / NS_PER_MS));
    if (n < 0 || (size_t)n >= cap)
        return n;
    buf += n;
    cap -= (size_t)n;
    return n + snprintf(buf, cap,
                    ",\"ipc_id\":%d,\"ipc_same\":%s,\"ipc_peers\":%d,\"ipc_stale_ms\":%lld,"
                    "\"peer_port\":%ld,\"peer_replies\":%llu,\"peer_errors\":%llu,\"peer_reconnects\":%llu,"
                    "\"peer_reply_age_ms\":%lld}",
                    g_pod_sem_id, same ? "true" : "false", peers, (long long)(stale / NS_PER_MS), opt_pod_peer,
                    (unsigned long long)g_peer_replies, (unsigned long long)g_peer_errors,
                    (unsigned long long)g_peer_reconnects,
                    (long long)(g_peer_last_reply_ns ? (now - g_peer_last_reply_ns) / NS_PER_MS : -1));
}

static void do_verify(void)
{
    int64_t t0 = mono_ns();
    uint64_t bad = 0;
    int64_t first_bad = -1;
    for (uint64_t i = 0; i < g_pages; i++) {
        if (!page_ok(g_block + i * PAGE_WORDS, i, g_version[i])) {
            if (first_bad < 0)
                first_bad = (int64_t)i;
            bad++;
        }
    }
    for (uint64_t i = 0; g_churn && i < g_churn_pages; i++) {
        if (!page_ok(g_churn + i * PAGE_WORDS, CHURN_FIRST_PAGE + i, g_churn_gen)) {
            if (first_bad < 0)
                first_bad = (int64_t)(g_pages + i);
            bad++;
        }
    }
    uint64_t shm_bad = 0;
    int shm_same = shm_check(&shm_bad);
    bad += shm_bad;
    g_verify_seq++;
    char pod[640];
    pod_report(pod, sizeof pod);
    char buf[1536];
    int n = snprintf(buf, sizeof buf,
                     "{\"seq\":%llu,\"ok\":%s,\"bad_pages\":%llu,\"first_bad_page\":%lld,"
                     "\"pages\":%llu,\"counter\":%llu,\"realtime_ns\":%lld,"
                     "\"duration_ns\":%lld,\"shm_id\":%d,\"shm_pages\":%llu,\"shm_bad_pages\":%llu,"
                     "\"shm_same\":%s%s}\n",
                     (unsigned long long)g_verify_seq, bad == 0 && shm_same ? "true" : "false",
                     (unsigned long long)bad, (long long)first_bad,
                     (unsigned long long)g_pages, (unsigned long long)g_counter,
                     (long long)real_ns(), (long long)(mono_ns() - t0), g_shm_id,
                     (unsigned long long)g_shm_pages, (unsigned long long)shm_bad, shm_same ? "true" : "false",
                     pod);
    if (n > 0 && (size_t)n < sizeof buf)
        write_atomic(g_verify_path, g_verify_tmp, buf, (size_t)n);
}

static void *map_anon(size_t len);

/* A new churn mapping (next generation) replaces the old one. */
static void churn(void)
{
    size_t len = (size_t)g_churn_pages * PAGE_BYTES;
    uint64_t *fresh = map_anon(len);
    g_churn_gen++;
    for (uint64_t i = 0; i < g_churn_pages; i++)
        fill_page(fresh + i * PAGE_WORDS, CHURN_FIRST_PAGE + i, g_churn_gen);
    if (g_churn)
        munmap(g_churn, len);
    g_churn = fresh;
}

static void heartbeat(void)
{
    char body[80], line[112];
    g_counter++;
    int m = snprintf(body, sizeof body, "%llu %lld %lld", (unsigned long long)g_counter, (long long)real_ns(),
                     (long long)mono_ns());
    uint64_t h = FNV_OFFSET;
    for (int i = 0; i < m && i < (int)sizeof body; i++) {
        h ^= (unsigned char)body[i];
        h *= FNV_PRIME;
    }
    int n = snprintf(line, sizeof line, "%s %016llx\n", body, (unsigned long long)h);
    /* One write() per line on an O_APPEND fd: lines never interleave or tear
     * (short of a full disk, which the reader tolerates as a partial line). */
    if (n > 0 && write(g_hb_fd, line, (size_t)n) < 0) {
        static int warned;
        if (!warned) {
            warned = 1;
            fprintf(stderr, "tug-workload: heartbeat write failed: %s\n", strerror(errno));
        }
    }
}

static void dirty_one(void)
{
    uint64_t i = xorshift64s(&g_rng) % g_hot_pages;
    g_version[i]++;
    fill_page(g_block + i * PAGE_WORDS, i, g_version[i]);
    g_dirtied_total++;
    if (g_shm_pages && (g_dirtied_total & 3) == 0) { /* every 4th page dirtied is a shared one */
        uint64_t j = xorshift64s(&g_rng) % g_shm_pages;
        g_shm_version[j]++;
        fill_page(g_shm + j * PAGE_WORDS, SHM_SEED_BASE + j, g_shm_version[j]);
    }
}

/* Dirtying is paced against a base (time, count) pair: by time t the workload
 * owes rate * (t - base_ns) pages since base_count. */
static int64_t g_dirty_base_ns;
static uint64_t g_dirty_base_count;

static int64_t dirty_tick(int64_t now)
{
    const uint64_t rate = opt_dirty_rate;
    if (now < g_dirty_base_ns) { /* monotonic clock stepped back (restore on another host) */
        g_dirty_base_ns = now;
        g_dirty_base_count = g_dirtied_total;
    }
    uint64_t target = (uint64_t)((unsigned __int128)(uint64_t)(now - g_dirty_base_ns) * rate / NS_PER_S);
    uint64_t done = g_dirtied_total - g_dirty_base_count;
    uint64_t backlog_cap = (uint64_t)((unsigned __int128)rate * DIRTY_BACKLOG_NS / NS_PER_S);
    if (target > done + backlog_cap) {
        /* We were frozen or starved: forgive all but DIRTY_BACKLOG_NS of it
         * instead of bursting through seconds of owed work. */
        g_dirty_base_ns = now - DIRTY_BACKLOG_NS;
        g_dirty_base_count = g_dirtied_total;
        done = 0;
        target = backlog_cap;
    }
    while (done < target && !g_stop) {
        dirty_one();
        done++;
    }
    /* Due time of the next page, but never sooner than DIRTY_MIN_STEP_NS. */
    int64_t next = g_dirty_base_ns +
                   (int64_t)(((unsigned __int128)(done + 1) * NS_PER_S + rate - 1) / rate);
    if (next < now + DIRTY_MIN_STEP_NS)
        next = now + DIRTY_MIN_STEP_NS;
    return next;
}

/* ---- TCP server ------------------------------------------------------- */

enum { MODE_LINE, MODE_SUM };

struct client {
    int fd;
    int mode;
    int eof;
    int discarding; /* dropping an over-long line up to its '\n' */
    size_t in_len;
    size_t out_head, out_tail;
    uint64_t bulk_left, bulk_state;
    uint64_t sum_left, sum_hash;
    unsigned char in[IN_CAP];
    unsigned char out[OUT_CAP];
};

static struct client g_clients[MAX_CLIENTS];
static int g_listen_fd = -1;

static size_t out_len(const struct client *c) { return c->out_tail - c->out_head; }

static void out_compact(struct client *c)
{
    if (c->out_head == 0)
        return;
    size_t n = out_len(c);
    memmove(c->out, c->out + c->out_head, n);
    c->out_head = 0;
    c->out_tail = n;
}

static void out_append(struct client *c, const char *s, size_t n)
{
    if (c->out_tail + n > OUT_CAP)
        out_compact(c);
    if (c->out_tail + n > OUT_CAP)
        return; /* cannot happen: callers keep OUT_RESERVE free */
    memcpy(c->out + c->out_tail, s, n);
    c->out_tail += n;
}

static void bulk_fill(struct client *c)
{
    out_compact(c);
    while (c->bulk_left > 0 && OUT_CAP - c->out_tail >= 8) {
        uint64_t x = xorshift64s(&c->bulk_state);
        size_t n = c->bulk_left < 8 ? (size_t)c->bulk_left : 8;
        for (size_t k = 0; k < n; k++)
            c->out[c->out_tail + k] = (unsigned char)(x >> (8 * k)); /* little endian */
        c->out_tail += n;
        c->bulk_left -= n;
    }
}

static void in_consume(struct client *c, size_t n)
{
    memmove(c->in, c->in + n, c->in_len - n);
    c->in_len -= n;
}

/* Protocol (requests end in '\n', an optional '\r' before it is ignored):
 *   GET <id>              -> "<id> <counter>\n"
 *   BULK <nbytes> <seed>  -> nbytes bytes of xorshift64* output seeded with
 *                            seed (0 -> GOLDEN), each 64-bit word little
 *                            endian, the last word truncated
 *   SUM <nbytes>          -> reads nbytes raw bytes, replies "%016x\n" of
 *                            their FNV-1a 64
 *   anything else         -> "ERR\n"                                         */
static void handle_line(struct client *c, char *line)
{
    char reply[MAX_ID_LEN + 64];
    uint64_t a, b;

    if (strncmp(line, "GET ", 4) == 0) {
        const char *id = line + 4;
        size_t len = strlen(id);
        if (len > 0 && len <= MAX_ID_LEN && strpbrk(id, " \t") == NULL) {
            int n = snprintf(reply, sizeof reply, "%s %llu\n", id, (unsigned long long)g_counter);
            out_append(c, reply, (size_t)n);
            return;
        }
    } else if (strncmp(line, "BULK ", 5) == 0) {
        char *sp = strchr(line + 5, ' ');
        if (sp) {
            *sp = '\0';
            if (parse_u64(line + 5, &a) == 0 && parse_u64(sp + 1, &b) == 0) {
                c->bulk_left = a;
                c->bulk_state = b ? b : GOLDEN;
                return;
            }
        }
    } else if (strncmp(line, "SUM ", 4) == 0) {
        if (parse_u64(line + 4, &a) == 0) {
            c->mode = MODE_SUM;
            c->sum_left = a;
            c->sum_hash = FNV_OFFSET;
            return;
        }
    }
    out_append(c, "ERR\n", 4);
}

/* Turn buffered input into output as far as output space allows. */
static void client_process(struct client *c)
{
    for (;;) {
        if (c->bulk_left > 0) {
            bulk_fill(c);
            if (c->bulk_left > 0)
                return; /* wait for the socket to take some */
        }
        if (c->mode == MODE_SUM) {
            size_t n = c->in_len;
            if ((uint64_t)n > c->sum_left)
                n = (size_t)c->sum_left;
            uint64_t h = c->sum_hash;
            for (size_t k = 0; k < n; k++) {
                h ^= c->in[k];
                h *= FNV_PRIME;
            }
            c->sum_hash = h;
            c->sum_left -= n;
            in_consume(c, n);
            if (c->sum_left > 0)
                return; /* wait for more input */
            if (OUT_CAP - out_len(c) < OUT_RESERVE)
                return;
            char reply[32];
            int r = snprintf(reply, sizeof reply, "%016llx\n", (unsigned long long)c->sum_hash);
            out_append(c, reply, (size_t)r);
            c->mode = MODE_LINE;
            continue;
        }
        if (OUT_CAP - out_len(c) < OUT_RESERVE)
            return; /* slow reader: stop answering until it drains */
        unsigned char *nl = memchr(c->in, '\n', c->in_len);
        if (!nl) {
            if (c->in_len == IN_CAP) { /* over-long line: drop it, answer ERR at its end */
                c->discarding = 1;
                c->in_len = 0;
            }
            return;
        }
        size_t len = (size_t)(nl - c->in);
        if (c->discarding) {
            c->discarding = 0;
            in_consume(c, len + 1);
            out_append(c, "ERR\n", 4);
            continue;
        }
        char line[IN_CAP];
        memcpy(line, c->in, len);
        line[len] = '\0';
        if (len > 0 && line[len - 1] == '\r')
            line[len - 1] = '\0';
        in_consume(c, len + 1);
        handle_line(c, line);
    }
}

static void client_close(struct client *c)
{
    close(c->fd);
    c->fd = -1;
}

/* Generate and send until the socket would block or there is nothing left;
 * close the connection when the peer is gone and everything was sent. */
static void client_pump(struct client *c)
{
    for (;;) {
        client_process(c);
        if (out_len(c) == 0)
            break;
        ssize_t n = send(c->fd, c->out + c->out_head, out_len(c), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            c->out_head += (size_t)n;
            if (c->out_head == c->out_tail)
                c->out_head = c->out_tail = 0;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        client_close(c);
        return;
    }
    if (c->eof && out_len(c) == 0 && c->bulk_left == 0)
        client_close(c);
}

static void client_read(struct client *c)
{
    while (c->in_len < IN_CAP) {
        ssize_t n = recv(c->fd, c->in + c->in_len, IN_CAP - c->in_len, MSG_DONTWAIT);
        if (n > 0) {
            c->in_len += (size_t)n;
            client_process(c);
            continue;
        }
        if (n == 0) {
            c->eof = 1;
            break;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            break;
        client_close(c);
        return;
    }
    client_pump(c);
}

static void server_accept(void)
{
    for (;;) {
        int fd = accept4(g_listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return; /* EAGAIN, or a transient error: poll will tell us again */
        struct client *c = NULL;
        for (int k = 0; k < MAX_CLIENTS; k++) {
            if (g_clients[k].fd < 0) {
                c = &g_clients[k];
                break;
            }
        }
        if (!c) {
            close(fd); /* full: refuse explicitly rather than leave it hanging */
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->fd = fd;
        c->mode = MODE_LINE;
        c->eof = 0;
        c->discarding = 0;
        c->in_len = 0;
        c->out_head = c->out_tail = 0;
        c->bulk_left = 0;
        c->sum_left = 0;
    }
}

static void server_start(void)
{
    for (int k = 0; k < MAX_CLIENTS; k++)
        g_clients[k].fd = -1;
    if (opt_port == 0)
        return;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fprintf(stderr, "tug-workload: socket: %s (continuing without server)\n", strerror(errno));
        return;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)opt_port);
    sa.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, MAX_CLIENTS) < 0) {
        fprintf(stderr, "tug-workload: cannot listen on port %ld: %s (continuing without server)\n",
                opt_port, strerror(errno));
        close(fd);
        return;
    }
    g_listen_fd = fd;
}

/* ---- setup ------------------------------------------------------------ */

static void on_stop(int sig) { (void)sig; g_stop = 1; }
static void on_usr1(int sig) { (void)sig; g_verify = 1; }

static void usage(FILE *f)
{
    fprintf(f,
            "usage: tug-workload [--memory MIB] [--dirty-rate PAGES_PER_S] [--hot-set FRACTION]\n"
            "                    [--state DIR] [--port N] [--interval-ms N] [--churn-mib MIB]\n"
            "  --memory MIB        anonymous memory to fill and verify (default 64)\n"
            "  --dirty-rate N      pages rewritten per second (default 0)\n"
            "  --hot-set F         dirty only the first ceil(F*pages) pages, 0<F<=1 (default 1.0)\n"
            "  --state DIR         heartbeat.log, status.json, verify.json (default /state)\n"
            "  --port N            TCP port on 0.0.0.0, 0 disables (default 7000)\n"
            "  --interval-ms N     heartbeat interval (default 10)\n"
            "  --churn-mib MIB     every 200 ms map a new region this big, unmap the last (default 0)\n"
            "  --sysv-shm MIB      also a SysV shared memory segment, dirtied and verified (default 0)\n"
            "  --lock FILE         hold a POSIX write lock on FILE (created) while running\n"
            "  --pod-ipc KEY       a pod: SysV semaphores and a segment by KEY, shared\n"
            "  --pod-no-shm        a pod's member that does not attach the segment\n"
            "  --pod-slot N        this member's slot in it, 0..63 (default 0)\n"
            "  --pod-peer PORT     keep a connection to 127.0.0.1:PORT, a GET every 50 ms\n"
            "signals: SIGUSR1 verify memory -> verify.json; SIGTERM/SIGINT exit 0\n");
}

static void bad_arg(const char *opt, const char *val)
{
    fprintf(stderr, "tug-workload: bad value for --%s: %s\n", opt, val);
    usage(stderr);
    exit(2);
}

static void parse_args(int argc, char **argv)
{
    static const struct option opts[] = {
        {"memory", required_argument, NULL, 'm'},
        {"dirty-rate", required_argument, NULL, 'd'},
        {"hot-set", required_argument, NULL, 'h'},
        {"state", required_argument, NULL, 's'},
        {"port", required_argument, NULL, 'p'},
        {"interval-ms", required_argument, NULL, 'i'},
        {"churn-mib", required_argument, NULL, 'c'},
        {"sysv-shm", required_argument, NULL, 'S'},
        {"lock", required_argument, NULL, 'L'},
        {"pod-ipc", required_argument, NULL, 'K'},
        {"pod-slot", required_argument, NULL, 'N'},
        {"pod-peer", required_argument, NULL, 'P'},
        {"pod-no-shm", no_argument, NULL, 'Z'},
        {"help", no_argument, NULL, 'H'},
        {NULL, 0, NULL, 0},
    };
    int ch;
    uint64_t v;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'm':
            if (parse_u64(optarg, &v) < 0 || v < 1 || v > (1u << 20))
                bad_arg("memory", optarg);
            opt_memory_mib = v;
            break;
        case 'd':
            if (parse_u64(optarg, &v) < 0 || v > 100000000ULL)
                bad_arg("dirty-rate", optarg);
            opt_dirty_rate = v;
            break;
        case 'h': {
            char *end;
            errno = 0;
            double f = strtod(optarg, &end);
            if (errno || end == optarg || *end || !(f > 0.0 && f <= 1.0))
                bad_arg("hot-set", optarg);
            opt_hot_set = f;
            break;
        }
        case 's':
            if (!*optarg || strlen(optarg) > 4000)
                bad_arg("state", optarg);
            opt_state = optarg;
            break;
        case 'p':
            if (parse_u64(optarg, &v) < 0 || v > 65535)
                bad_arg("port", optarg);
            opt_port = (long)v;
            break;
        case 'i':
            if (parse_u64(optarg, &v) < 0 || v < 1 || v > 3600000)
                bad_arg("interval-ms", optarg);
            opt_interval_ms = (int64_t)v;
            break;
        case 'c':
            if (parse_u64(optarg, &v) < 0 || v > 1024)
                bad_arg("churn-mib", optarg);
            opt_churn_mib = v;
            break;
        case 'S':
            if (parse_u64(optarg, &v) < 0 || v > 4096)
                bad_arg("sysv-shm", optarg);
            opt_sysv_shm_mib = v;
            break;
        case 'L':
            if (!*optarg || strlen(optarg) > 4000)
                bad_arg("lock", optarg);
            opt_lock = optarg;
            break;
        case 'K':
            if (parse_u64(optarg, &v) < 0 || v < 1 || v > 0x7fffffffULL)
                bad_arg("pod-ipc", optarg);
            opt_pod_ipc_key = (long)v;
            break;
        case 'N':
            if (parse_u64(optarg, &v) < 0 || v >= POD_SLOTS)
                bad_arg("pod-slot", optarg);
            opt_pod_slot = (long)v;
            break;
        case 'P':
            if (parse_u64(optarg, &v) < 0 || v < 1 || v > 65535)
                bad_arg("pod-peer", optarg);
            opt_pod_peer = (long)v;
            break;
        case 'Z':
            opt_pod_shm = 0;
            break;
        case 'H':
            usage(stdout);
            exit(0);
        default:
            usage(stderr);
            exit(2);
        }
    }
    if (optind < argc) {
        fprintf(stderr, "tug-workload: unexpected argument: %s\n", argv[optind]);
        usage(stderr);
        exit(2);
    }
}

static void *map_anon(size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        fprintf(stderr, "tug-workload: mmap %zu bytes: %s\n", len, strerror(errno));
        exit(1);
    }
    return p;
}

/* A deadline more than one period ahead means CLOCK_MONOTONIC went back
 * (restored on a host that booted later): re-anchor it at now. */
static int64_t sane_deadline(int64_t deadline, int64_t now, int64_t period)
{
    return deadline > now + period ? now : deadline;
}

/* Next slot on the period grid strictly after now, skipping missed slots. */
static int64_t next_slot(int64_t deadline, int64_t now, int64_t period)
{
    deadline += period;
    if (deadline <= now)
        deadline += ((now - deadline) / period + 1) * period;
    return deadline;
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);

    if (mkdir(opt_state, 0755) < 0 && errno != EEXIST) {
        fprintf(stderr, "tug-workload: mkdir %s: %s\n", opt_state, strerror(errno));
        return 1;
    }
    snprintf(g_hb_path, sizeof g_hb_path, "%s/heartbeat.log", opt_state);
    snprintf(g_status_path, sizeof g_status_path, "%s/status.json", opt_state);
    snprintf(g_status_tmp, sizeof g_status_tmp, "%s/status.json.tmp", opt_state);
    snprintf(g_verify_path, sizeof g_verify_path, "%s/verify.json", opt_state);
    snprintf(g_verify_tmp, sizeof g_verify_tmp, "%s/verify.json.tmp", opt_state);

    g_hb_fd = open(g_hb_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (g_hb_fd < 0) {
        fprintf(stderr, "tug-workload: open %s: %s\n", g_hb_path, strerror(errno));
        return 1;
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = on_stop; /* no SA_RESTART: poll() returns EINTR at once */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);

    g_pages = opt_memory_mib * (1024 * 1024 / PAGE_BYTES);
    double hot = opt_hot_set * (double)g_pages;
    g_hot_pages = (uint64_t)hot;
    if ((double)g_hot_pages < hot)
        g_hot_pages++;
    if (g_hot_pages < 1)
        g_hot_pages = 1;
    if (g_hot_pages > g_pages)
        g_hot_pages = g_pages;

    g_block = map_anon((size_t)g_pages * PAGE_BYTES);
    g_version = map_anon((size_t)g_pages * sizeof *g_version);
    for (uint64_t i = 0; i < g_pages; i++)
        fill_page(g_block + i * PAGE_WORDS, i, 0);

    g_churn_pages = opt_churn_mib * (1024 * 1024 / PAGE_BYTES);
    if (g_churn_pages)
        churn();
    if (opt_lock) {
        int lfd = open(opt_lock, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
        if (lfd < 0 || fcntl(lfd, F_SETLK, &fl) < 0) {
            fprintf(stderr, "tug-workload: lock %s: %s\n", opt_lock, strerror(errno));
            return 1;
        }
    }
    if (opt_sysv_shm_mib) {
        g_shm_pages = opt_sysv_shm_mib * (1024 * 1024 / PAGE_BYTES);
        g_shm_id = shmget(IPC_PRIVATE, (size_t)g_shm_pages * PAGE_BYTES, IPC_CREAT | 0600);
        void *p = g_shm_id < 0 ? (void *)-1 : shmat(g_shm_id, NULL, 0);
        if (p == (void *)-1) {
            fprintf(stderr, "tug-workload: SysV segment of %llu MiB: %s\n", (unsigned long long)opt_sysv_shm_mib,
                    strerror(errno));
            return 1;
        }
        g_shm = p;
        g_shm_version = map_anon((size_t)g_shm_pages * sizeof *g_shm_version);
        for (uint64_t j = 0; j < g_shm_pages; j++)
            fill_page(g_shm + j * PAGE_WORDS, SHM_SEED_BASE + j, 0);
    }

    g_started_realtime_ns = real_ns();
    g_rng ^= (uint64_t)g_started_realtime_ns; /* page choice need not be reproducible */
    if (!g_rng)
        g_rng = GOLDEN;

    server_start();
    pod_start();
    fprintf(stderr,
            "tug-workload: pid %d, %llu MiB (%llu pages, %llu hot), dirty %llu pages/s, "
            "state %s, port %ld%s\n",
            (int)getpid(), (unsigned long long)opt_memory_mib, (unsigned long long)g_pages,
            (unsigned long long)g_hot_pages, (unsigned long long)opt_dirty_rate, opt_state,
            opt_port, g_listen_fd < 0 ? " (no server)" : "");

    const int64_t hb_period = opt_interval_ms * NS_PER_MS;
    const int64_t dirty_period =
        opt_dirty_rate > 0 ? NS_PER_S / (int64_t)opt_dirty_rate + DIRTY_MIN_STEP_NS : 0;
    int64_t now = mono_ns();
    int64_t next_hb = now, next_status = now, next_dirty = now, next_churn = now + CHURN_PERIOD_NS;
    int64_t next_peer = now;
    g_dirty_base_ns = now;
    g_dirty_base_count = 0;

    struct pollfd pfds[2 + MAX_CLIENTS];
    struct client *owners[2 + MAX_CLIENTS];
    static struct client peer_marker; /* owners[] entry of the pod peer's fd */

    while (!g_stop) {
        now = mono_ns();
        next_hb = sane_deadline(next_hb, now, hb_period);
        next_status = sane_deadline(next_status, now, STATUS_PERIOD_NS);
        if (opt_dirty_rate > 0)
            next_dirty = sane_deadline(next_dirty, now, dirty_period);
        next_churn = sane_deadline(next_churn, now, CHURN_PERIOD_NS);
        next_peer = sane_deadline(next_peer, now, PEER_PERIOD_NS);

        if (g_verify) {
            g_verify = 0;
            do_verify();
            write_status();
        }
        if (now >= next_hb) {
            heartbeat();
            pod_tick();
            next_hb = next_slot(next_hb, now, hb_period);
        }
        if (opt_dirty_rate > 0 && now >= next_dirty)
            next_dirty = dirty_tick(now);
        if (g_churn_pages && now >= next_churn) {
            churn();
            next_churn = next_slot(next_churn, now, CHURN_PERIOD_NS);
        }
        if (now >= next_status) {
            write_status();
            next_status = next_slot(next_status, now, STATUS_PERIOD_NS);
        }
        if (opt_pod_peer && now >= next_peer) {
            peer_tick();
            next_peer = next_slot(next_peer, now, PEER_PERIOD_NS);
        }

        nfds_t nfds = 0;
        if (g_listen_fd >= 0) {
            pfds[nfds] = (struct pollfd){.fd = g_listen_fd, .events = POLLIN};
            owners[nfds++] = NULL;
        }
        if (g_peer_fd >= 0 && g_peer_waiting) {
            pfds[nfds] = (struct pollfd){.fd = g_peer_fd, .events = POLLIN};
            owners[nfds++] = &peer_marker;
        }
        for (int k = 0; k < MAX_CLIENTS; k++) {
            struct client *c = &g_clients[k];
            if (c->fd < 0)
                continue;
            short ev = 0;
            if (!c->eof && c->in_len < IN_CAP)
                ev |= POLLIN;
            if (out_len(c) > 0 || c->bulk_left > 0)
                ev |= POLLOUT;
            pfds[nfds] = (struct pollfd){.fd = c->fd, .events = ev};
            owners[nfds++] = c;
        }

        int64_t due = next_hb < next_status ? next_hb : next_status;
        if (opt_dirty_rate > 0 && next_dirty < due)
            due = next_dirty;
        if (g_churn_pages && next_churn < due)
            due = next_churn;
        if (opt_pod_peer && next_peer < due)
            due = next_peer;
        int64_t wait_ns = due - mono_ns();
        int timeout = wait_ns <= 0 ? 0 : (int)((wait_ns + NS_PER_MS - 1) / NS_PER_MS);
        if (timeout > 1000)
            timeout = 1000;
        if (g_verify || g_stop)
            timeout = 0;

        int n = poll(pfds, nfds, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "tug-workload: poll: %s\n", strerror(errno));
            return 1;
        }
        for (nfds_t k = 0; k < nfds && n > 0; k++) {
            short re = pfds[k].revents;
            if (!re)
                continue;
            struct client *c = owners[k];
            if (!c) {
                server_accept();
                continue;
            }
            if (c == &peer_marker) {
                if (g_peer_fd >= 0)
                    peer_read();
                continue;
            }
            if (c->fd < 0)
                continue;
            if (re & POLLERR) {
                client_close(c);
            } else if (re & POLLIN) {
                client_read(c);
            } else if (re & POLLOUT) {
                client_pump(c);
            } else if (re & (POLLHUP | POLLNVAL)) {
                client_close(c);
            }
        }
    }

    for (int k = 0; k < MAX_CLIENTS; k++)
        if (g_clients[k].fd >= 0)
            client_close(&g_clients[k]);
    if (g_listen_fd >= 0)
        close(g_listen_fd);
    write_status();
    close(g_hb_fd);
    return 0;
}
