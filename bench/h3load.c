/* h3load: HTTP/3 load generator on libcurl's multi interface (see bench/h3load.md).
 *
 *   h3load -c CONNS -m STREAMS -d SECONDS [-t WARMUP] [-T THREADS]
 *          [--cacert F | -k] [--method M --data-size N] [--json] URL
 *
 * One multi handle per connection, each with m easy handles, so every connection
 * keeps exactly m requests in flight. (One multi for all c connections left some
 * connections nearly idle and others full: libcurl hands a free stream slot to
 * whichever handle asks first.) Easy handles are set up once and re-added as soon as
 * they finish. Threads (-T) split the connections between them.
 * Build: bench/build_h3load.sh (links libcurl-gnutls: Debian's OpenSSL libcurl has no
 * HTTP/3). */
#define _GNU_SOURCE
#include <curl/curl.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#define MAX_HANDLES 100000

// curl_multi_waitfds fills struct curl_waitfd; poll() reads the same memory.
_Static_assert(sizeof(struct curl_waitfd) == sizeof(struct pollfd) &&
                   CURL_WAIT_POLLIN == POLLIN && CURL_WAIT_POLLOUT == POLLOUT,
               "struct curl_waitfd must match struct pollfd");

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t cpu_ns(void) {  // whole process, all threads
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ((int64_t)ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000 +
         ((int64_t)ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000;
}

/* --- latency histogram (HdrHistogram-style log buckets, microseconds) ------------
 * 64..128 linear sub-buckets per power of two; a percentile is its bucket's upper
 * bound, at most 1.6% high. Fixed 30 KB, no per-request allocation, any run length. */
#define SUB_BITS 7
#define SUB_COUNT (1 << SUB_BITS)
#define SUB_HALF (SUB_COUNT / 2)
#define HIST_LEN ((64 - SUB_BITS) * SUB_HALF + SUB_COUNT)

typedef struct {
  uint64_t counts[HIST_LEN];
  uint64_t total, max_us, sum_us;
} hist_t;

static int hist_index(uint64_t v) {
  int msb = 63 - __builtin_clzll(v | 1);
  int b = msb >= SUB_BITS ? msb - SUB_BITS + 1 : 0;
  return b * SUB_HALF + (int)(v >> b);
}

static uint64_t hist_upper(int idx) {  // highest value that maps to idx
  int b = idx < SUB_COUNT ? 0 : idx / SUB_HALF - 1;
  uint64_t sub = (uint64_t)(idx - b * SUB_HALF);
  return ((sub + 1) << b) - 1;
}

static void hist_add(hist_t *h, uint64_t us) {
  h->counts[hist_index(us)]++;
  h->total++;
  h->sum_us += us;
  if (us > h->max_us) h->max_us = us;
}

static void hist_merge(hist_t *into, const hist_t *h) {
  for (int i = 0; i < HIST_LEN; i++) into->counts[i] += h->counts[i];
  into->total += h->total;
  into->sum_us += h->sum_us;
  if (h->max_us > into->max_us) into->max_us = h->max_us;
}

static double hist_pct_ms(const hist_t *h, double p) {
  if (!h->total) return 0;
  uint64_t rank = (uint64_t)(p / 100.0 * (double)h->total + 0.5), seen = 0;
  if (rank < 1) rank = 1;
  for (int i = 0; i < HIST_LEN; i++) {
    seen += h->counts[i];
    if (seen >= rank) {
      uint64_t v = hist_upper(i);
      return (double)(v < h->max_us ? v : h->max_us) / 1000.0;
    }
  }
  return (double)h->max_us / 1000.0;
}

/* --- per-thread state -------------------------------------------------------------- */

struct group;

typedef struct slot {
  CURL *easy;
  struct group *g;
  int64_t start_ns;  // when it was (re-)added; for a parked slot, when to re-add it
  curl_off_t bytes;
  int reconnected;    // the last transfer opened a connection (a retry, or a reconnect)
  struct slot *next;  // parked list
  char errbuf[CURL_ERROR_SIZE];
} slot_t;

typedef struct {
  uint64_t done, ok, err_transfer, err_status, err_body, err_proto, bytes;
  uint64_t connects;    // CURLINFO_NUM_CONNECTS summed over every transfer, warmup too
  uint64_t conns_used;  // connections that delivered a response while measuring
  uint64_t by_code[CURL_LAST + 1];
  char first_error[CURL_ERROR_SIZE + 64];
  long first_bad_status;
  hist_t hist;
} stats_t;

typedef struct group {  // one connection: its own multi handle and m easy handles
  CURLM *multi;
  unsigned first_fd, nfds;  // this group's range in the worker's pollfd array
  int64_t due;              // when libcurl wants curl_multi_perform called again
  int answered;             // delivered a response while measuring
} group_t;

typedef struct {
  pthread_t tid;
  group_t *groups;
  struct pollfd *pfds;
  unsigned pfd_cap;
  slot_t *slots;
  long conns, nslots;
  int measuring;
  curl_off_t expect_bytes;  // -2: learn from the first 200, -1: no check
  int64_t t0, t_last;       // first and last loop times inside the measured window
  slot_t *parked, *parked_tail;  // failed transfers waiting out RETRY_NS, FIFO
  stats_t st;
} worker_t;

static int64_t t_measure, t_end;  // set before the threads start, read-only after
static int is_head;               // HEAD: Content-Length describes a body never sent
static atomic_int aborted;        // a fatal error: every thread stops
static char abort_reason[CURL_ERROR_SIZE + 144];  // written once, by whoever set aborted

static void abort_run(const char *what, const char *detail) {
  if (!atomic_exchange(&aborted, 1))
    snprintf(abort_reason, sizeof abort_reason, "%s: %s", what, detail);
}

/* A failed transfer is retried after this pause, so a dead server does not make the
 * client spin at 100% CPU counting errors. */
#define RETRY_NS 10000000

/* Errors that retrying cannot fix: stop the whole run at once. */
static int is_fatal(CURLcode rc) {
  switch (rc) {
    case CURLE_UNSUPPORTED_PROTOCOL: case CURLE_URL_MALFORMAT: case CURLE_NOT_BUILT_IN:
    case CURLE_COULDNT_RESOLVE_HOST: case CURLE_UNKNOWN_OPTION: case CURLE_SSL_CERTPROBLEM:
    case CURLE_PEER_FAILED_VERIFICATION: case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_CRL_BADFILE:
      return 1;
    default:
      return 0;
  }
}

static size_t on_body(char *p, size_t sz, size_t n, void *ud) {
  (void)p;
  ((slot_t *)ud)->bytes += (curl_off_t)(sz * n);
  return sz * n;
}

/* The request every handle makes, set once in main. */
static struct {
  const char *url, *method, *cacert;
  struct curl_slist *headers;
  const char *body;
  long data_size;
  double connect_timeout;
  int insecure, verbose;
} req;

static void setup_easy(CURL *e, slot_t *s) {
  curl_easy_setopt(e, CURLOPT_URL, req.url);
  curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_3ONLY);
  curl_easy_setopt(e, CURLOPT_PIPEWAIT, 1L);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(e, CURLOPT_PRIVATE, s);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, s);
  curl_easy_setopt(e, CURLOPT_ERRORBUFFER, s->errbuf);
  curl_easy_setopt(e, CURLOPT_USERAGENT, "h3load");
  curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)(req.connect_timeout * 1000));
  if (req.verbose) curl_easy_setopt(e, CURLOPT_VERBOSE, 1L);
  if (req.cacert) {
    curl_easy_setopt(e, CURLOPT_CAINFO, req.cacert);
    // No system CA dir: then libcurl loads the file once per multi, not per handshake.
    curl_easy_setopt(e, CURLOPT_CAPATH, NULL);
  }
  if (req.insecure) {
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 0L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 0L);
  }
  if (req.headers) curl_easy_setopt(e, CURLOPT_HTTPHEADER, req.headers);
  if (req.body) {
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)req.data_size);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, req.body);
  }
  if (!strcmp(req.method, "HEAD")) curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
  else if (strcmp(req.method, "GET") || req.body)
    curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, req.method);
}

/* Check one finished transfer; record it if it ended inside the measured window.
 * Latency is recorded for every response (any status), not for transfer errors. */
static void finish(worker_t *w, slot_t *s, CURLcode rc, int64_t end) {
  stats_t *st = &w->st;
  long nc = 0, status = 0, ver = 0;
  curl_off_t cl = -1;
  curl_easy_getinfo(s->easy, CURLINFO_NUM_CONNECTS, &nc);
  st->connects += (uint64_t)nc;
  s->reconnected = nc > 0;
  if (rc != CURLE_OK && is_fatal(rc)) {
    char what[128];
    snprintf(what, sizeof what, "curl error %d (%s)", (int)rc, curl_easy_strerror(rc));
    abort_run(what, s->errbuf);
  }
  if (!w->measuring) return;
  st->done++;
  if (rc != CURLE_OK) {
    st->err_transfer++;
    st->by_code[rc < CURL_LAST ? rc : CURL_LAST]++;
    if (!st->first_error[0])
      snprintf(st->first_error, sizeof st->first_error, "curl error %d (%s): %s", (int)rc,
               curl_easy_strerror(rc), s->errbuf);
    return;
  }
  // Per group, not per CURLINFO_CONN_ID: libcurl often reports -1 for a finished
  // multiplexed transfer. A group holds one connection at a time (reconnects: `connects`).
  if (!s->g->answered) {
    s->g->answered = 1;
    st->conns_used++;
  }
  hist_add(&st->hist, (uint64_t)((end - s->start_ns) / 1000));
  curl_easy_getinfo(s->easy, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_getinfo(s->easy, CURLINFO_HTTP_VERSION, &ver);
  if (!is_head) curl_easy_getinfo(s->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
  st->bytes += (uint64_t)s->bytes;
  if (ver != CURL_HTTP_VERSION_3) {
    st->err_proto++;
    return;
  }
  if (status != 200) {
    if (!st->err_status) st->first_bad_status = status;
    st->err_status++;
    return;
  }
  if (w->expect_bytes == -2) w->expect_bytes = s->bytes;
  if ((cl >= 0 && cl != s->bytes) || (w->expect_bytes >= 0 && s->bytes != w->expect_bytes)) {
    st->err_body++;
    return;
  }
  st->ok++;
}

/* Run one group's transfers and restart the finished ones. */
static void perform(worker_t *w, group_t *g) {
  int running = 0, q;
  CURLMcode mc = curl_multi_perform(g->multi, &running);
  int64_t now = now_ns();  // completion time of whatever finished in there
  if (mc != CURLM_OK) {
    abort_run("curl_multi_perform", curl_multi_strerror(mc));
    return;
  }
  CURLMsg *msg;
  while ((msg = curl_multi_info_read(g->multi, &q))) {
    if (msg->msg != CURLMSG_DONE) continue;
    CURL *e = msg->easy_handle;
    CURLcode rc = msg->data.result;  // msg dies with remove_handle: read it first
    slot_t *s;
    curl_easy_getinfo(e, CURLINFO_PRIVATE, (char **)&s);
    finish(w, s, rc, now);
    curl_multi_remove_handle(g->multi, e);
    s->bytes = 0;
    s->errbuf[0] = 0;
    if (rc != CURLE_OK) {  // park it
      s->start_ns = now + RETRY_NS;
      s->next = NULL;
      if (w->parked) w->parked_tail->next = s;
      else w->parked = s;
      w->parked_tail = s;
    } else if (now < t_end) {
      if (s->reconnected) {
        // libcurl before 8.17 never clears a handle's count of retries on a fresh
        // connection ("Connection died"): the sixth over the whole run fails. A server
        // that closes connections on reload causes one per reload; reset the handle.
        curl_easy_reset(e);
        setup_easy(e, s);
      }
      s->start_ns = now;
      curl_multi_add_handle(g->multi, e);  // options persist; the connection is reused
    }
  }
}

/* The loop: one poll() over every group's sockets (curl_multi_waitfds), then
 * curl_multi_perform on the groups whose sockets fired or whose timer is due.
 * Measured faster here than epoll + curl_multi_socket_action. */
static void *run_worker(void *arg) {
  worker_t *w = arg;
  int64_t now = now_ns();
  for (long i = 0; i < w->nslots; i++) {
    w->slots[i].start_ns = now;
    curl_multi_add_handle(w->slots[i].g->multi, w->slots[i].easy);
  }
  for (long i = 0; i < w->conns; i++) w->groups[i].due = now;
  for (;;) {
    for (long i = 0; i < w->conns; i++)
      if (w->groups[i].due <= now) perform(w, &w->groups[i]);
    now = now_ns();
    if (!w->measuring && now >= t_measure) {
      w->measuring = 1;
      w->t0 = now;
    }
    while (w->parked && w->parked->start_ns <= now && now < t_end) {
      slot_t *s = w->parked;
      w->parked = s->next;
      s->start_ns = now;
      curl_multi_add_handle(s->g->multi, s->easy);
    }
    w->t_last = now;
    if (now >= t_end || aborted) break;

    // Sleep until a socket fires, a libcurl timer is due, a parked retry is due, the
    // warmup ends or the run ends.
    int64_t wake = w->measuring ? t_end : t_measure;
    if (w->parked && w->parked->start_ns < wake) wake = w->parked->start_ns;
    unsigned n = 0;
    for (long i = 0; i < w->conns; i++) {
      group_t *g = &w->groups[i];
      unsigned cnt = 0;
      long ms = -1;
      curl_multi_waitfds(g->multi, (struct curl_waitfd *)(w->pfds + n), w->pfd_cap - n, &cnt);
      g->first_fd = n;
      g->nfds = cnt;
      n += cnt;
      curl_multi_timeout(g->multi, &ms);
      g->due = ms < 0 ? INT64_MAX : now + ms * 1000000;
      if (g->due < wake) wake = g->due;
    }
    int wait_ms = wake <= now ? 0 : (int)((wake - now + 999999) / 1000000);
    poll(w->pfds, n, wait_ms > 1000 ? 1000 : wait_ms);
    now = now_ns();
    for (long i = 0; i < w->conns; i++) {
      group_t *g = &w->groups[i];
      for (unsigned j = 0; j < g->nfds; j++)
        if (w->pfds[g->first_fd + j].revents) g->due = now;
    }
  }
  return NULL;
}

/* --- command line ------------------------------------------------------------------ */

static void usage(FILE *f) {
  fputs(
      "usage: h3load -c CONNECTIONS -m STREAMS -d SECONDS [options] URL\n"
      "  -c N               connections, default 1\n"
      "  -m N               concurrent streams per connection, default 1\n"
      "  -d SECONDS         measured duration (fractions allowed), default 10\n"
      "  -t SECONDS         unmeasured warmup before -d, default 0\n"
      "  -T N, --threads N  client threads, each with its share of -c, default 1\n"
      "  --cacert FILE      trust this CA/certificate (and not the system store)\n"
      "  -k, --insecure     do not verify the server certificate\n"
      "  --method M         GET (default), POST, PUT, HEAD, ...\n"
      "  --data-size N      request body of N bytes ('x'), for POST/PUT\n"
      "  -H 'Name: value'   extra request header (repeatable)\n"
      "  --expect-bytes N   required body length; default: the first 200's length;\n"
      "                     -1 = no check (Content-Length is always checked)\n"
      "  --connect-timeout S  per-connection handshake limit, default 10\n"
      "  --json             print one JSON object instead of the text report\n"
      "  -v, --verbose      libcurl verbose output on stderr (debugging only)\n"
      "  --version          print libcurl details; exit 1 if it lacks HTTP/3\n",
      f);
}

static int print_version(void) {
  const curl_version_info_data *v = curl_version_info(CURLVERSION_NOW);
  int h3 = !!(v->features & CURL_VERSION_HTTP3);
  printf("libcurl %s, ssl %s, quic %s, nghttp2 %s\nHTTP/3 feature: %s\n", v->version,
         v->ssl_version ? v->ssl_version : "none",
         v->quic_version ? v->quic_version : "none",
         v->nghttp2_version ? v->nghttp2_version : "none", h3 ? "yes" : "NO");
  return h3 ? 0 : 1;
}

static double parse_num(const char *s, const char *what, double lo, double hi) {
  char *end;
  double v = strtod(s, &end);
  if (end == s || *end || v < lo || v > hi) {
    fprintf(stderr, "h3load: bad %s: %s (want %g..%g)\n", what, s, lo, hi);
    exit(2);
  }
  return v;
}

static void json_str(const char *s) {
  putchar('"');
  for (; *s; s++) {
    unsigned char ch = (unsigned char)*s;
    if (ch == '"' || ch == '\\') printf("\\%c", ch);
    else if (ch < 0x20) printf("\\u%04x", ch);
    else putchar(ch);
  }
  putchar('"');
}

int main(int argc, char **argv) {
  long conns = 1, streams = 1, threads = 1;
  double duration = 10, warmup = 0, connect_timeout = 10;
  const char *cacert = NULL, *method = "GET";
  long data_size = -1;
  curl_off_t expect_bytes = -2;
  int insecure = 0, json = 0, verbose = 0;
  struct curl_slist *headers = NULL;

  enum { O_CACERT = 256, O_METHOD, O_DATA, O_EXPECT, O_JSON, O_VERSION, O_CTO };
  static const struct option lopts[] = {
      {"cacert", required_argument, 0, O_CACERT},
      {"insecure", no_argument, 0, 'k'},
      {"threads", required_argument, 0, 'T'},
      {"method", required_argument, 0, O_METHOD},
      {"data-size", required_argument, 0, O_DATA},
      {"expect-bytes", required_argument, 0, O_EXPECT},
      {"connect-timeout", required_argument, 0, O_CTO},
      {"json", no_argument, 0, O_JSON},
      {"verbose", no_argument, 0, 'v'},
      {"version", no_argument, 0, O_VERSION},
      {"help", no_argument, 0, 'h'},
      {0, 0, 0, 0}};
  int o;
  while ((o = getopt_long(argc, argv, "c:m:d:t:T:kH:vh", lopts, NULL)) != -1) {
    switch (o) {
      case 'c': conns = (long)parse_num(optarg, "-c", 1, MAX_HANDLES); break;
      case 'm': streams = (long)parse_num(optarg, "-m", 1, MAX_HANDLES); break;
      case 'd': duration = parse_num(optarg, "-d", 0.001, 86400); break;
      case 't': warmup = parse_num(optarg, "-t", 0, 86400); break;
      case 'T': threads = (long)parse_num(optarg, "-T", 1, 1024); break;
      case 'k': insecure = 1; break;
      case 'H': headers = curl_slist_append(headers, optarg); break;
      case 'v': verbose = 1; break;
      case O_CACERT: cacert = optarg; break;
      case O_METHOD: method = optarg; break;
      case O_DATA: data_size = (long)parse_num(optarg, "--data-size", 0, 1 << 30); break;
      case O_EXPECT: expect_bytes = (curl_off_t)parse_num(optarg, "--expect-bytes", -1, 1e15); break;
      case O_CTO: connect_timeout = parse_num(optarg, "--connect-timeout", 0.001, 3600); break;
      case O_JSON: json = 1; break;
      case O_VERSION: return print_version();
      case 'h': usage(stdout); return 0;
      default: usage(stderr); return 2;
    }
  }
  if (optind != argc - 1) {
    usage(stderr);
    return 2;
  }
  const char *url = argv[optind];
  if (conns * streams > MAX_HANDLES) {
    fprintf(stderr, "h3load: -c * -m must be <= %d\n", MAX_HANDLES);
    return 2;
  }
  if (threads > conns) threads = conns;

  if (curl_global_init(CURL_GLOBAL_DEFAULT)) {
    fputs("h3load: curl_global_init failed\n", stderr);
    return 2;
  }
  const curl_version_info_data *vi = curl_version_info(CURLVERSION_NOW);
  if (!(vi->features & CURL_VERSION_HTTP3)) {
    fprintf(stderr, "h3load: this libcurl has no HTTP/3 (libcurl %s, ssl %s); "
            "link libcurl-gnutls (bench/build_h3load.sh)\n",
            vi->version, vi->ssl_version ? vi->ssl_version : "none");
    return 2;
  }
  is_head = !strcmp(method, "HEAD");
  if (is_head) expect_bytes = 0;

  /* Body: one shared read-only buffer, sent by every handle. */
  char *body = NULL;
  if (data_size >= 0) {
    body = malloc((size_t)data_size + 1);
    if (!body) return 2;
    memset(body, 'x', (size_t)data_size);
    headers = curl_slist_append(headers, "Content-Type: application/octet-stream");
    headers = curl_slist_append(headers, "Expect:");  // no 100-continue round trip
  }

  req.url = url;
  req.method = method;
  req.cacert = cacert;
  req.headers = headers;
  req.body = body;
  req.data_size = data_size;
  req.connect_timeout = connect_timeout;
  req.insecure = insecure;
  req.verbose = verbose;

  worker_t *ws = calloc((size_t)threads, sizeof *ws);
  if (!ws) return 2;
  for (long t = 0; t < threads; t++) {
    worker_t *w = &ws[t];
    w->conns = conns / threads + (t < conns % threads);
    w->nslots = w->conns * streams;
    w->expect_bytes = expect_bytes;
    w->groups = calloc((size_t)w->conns, sizeof *w->groups);
    w->slots = calloc((size_t)w->nslots, sizeof *w->slots);
    w->pfd_cap = (unsigned)(w->conns * (streams + 4));  // >= one fd per transfer, + spare
    w->pfds = calloc(w->pfd_cap, sizeof *w->pfds);
    if (!w->groups || !w->slots || !w->pfds) return 2;
    for (long i = 0; i < w->conns; i++) {
      CURLM *m = w->groups[i].multi = curl_multi_init();
      if (!m) return 2;
      curl_multi_setopt(m, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
      curl_multi_setopt(m, CURLMOPT_MAX_HOST_CONNECTIONS, 1L);
      curl_multi_setopt(m, CURLMOPT_MAX_TOTAL_CONNECTIONS, 1L);
      curl_multi_setopt(m, CURLMOPT_MAXCONNECTS, 1L);
      // Without this libcurl packs up to the server's stream limit onto one connection.
      curl_multi_setopt(m, CURLMOPT_MAX_CONCURRENT_STREAMS, streams);
    }
    for (long i = 0; i < w->nslots; i++) {
      slot_t *s = &w->slots[i];
      s->g = &w->groups[i / streams];
      CURL *e = s->easy = curl_easy_init();
      if (!e) {
        fputs("h3load: curl_easy_init failed\n", stderr);
        return 2;
      }
      setup_easy(e, s);
    }
  }

  int64_t t_start = now_ns();
  t_measure = t_start + (int64_t)(warmup * 1e9);
  t_end = t_measure + (int64_t)(duration * 1e9);
  for (long t = 0; t < threads; t++)
    if (pthread_create(&ws[t].tid, NULL, run_worker, &ws[t])) {
      fputs("h3load: pthread_create failed\n", stderr);
      return 2;
    }
  struct timespec ts = {.tv_sec = t_measure / 1000000000, .tv_nsec = t_measure % 1000000000};
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL)) {}
  int64_t cpu0 = cpu_ns(), wall0 = now_ns();
  for (long t = 0; t < threads; t++) pthread_join(ws[t].tid, NULL);
  int64_t cpu1 = cpu_ns(), wall1 = now_ns();

  /* Merge the threads' results. */
  static stats_t st;
  int64_t t0 = INT64_MAX, t_last = 0;
  for (long t = 0; t < threads; t++) {
    stats_t *s = &ws[t].st;
    if (ws[t].measuring && ws[t].t0 < t0) t0 = ws[t].t0;
    if (ws[t].t_last > t_last) t_last = ws[t].t_last;
    if (!st.err_status && s->err_status) st.first_bad_status = s->first_bad_status;
    st.done += s->done;
    st.ok += s->ok;
    st.err_transfer += s->err_transfer;
    st.err_status += s->err_status;
    st.err_body += s->err_body;
    st.err_proto += s->err_proto;
    st.bytes += s->bytes;
    st.connects += s->connects;
    st.conns_used += s->conns_used;
    for (int c = 0; c <= CURL_LAST; c++) st.by_code[c] += s->by_code[c];
    if (!st.first_error[0] && s->first_error[0])
      memcpy(st.first_error, s->first_error, sizeof st.first_error);
    hist_merge(&st.hist, &s->hist);
  }
  double elapsed = t_last > t0 ? (double)(t_last - t0) / 1e9 : 0;
  double cpu_pct = wall1 - wall0 > 10000000 ? (double)(cpu1 - cpu0) / (double)(wall1 - wall0) * 100 : 0;
  uint64_t done = st.done;
  uint64_t errors = st.err_transfer + st.err_status + st.err_body + st.err_proto;
  double rps = elapsed > 0 ? (double)done / elapsed : 0;
  double mean_ms = done ? (double)st.hist.sum_us / (double)done / 1000 : 0;
  double p50 = hist_pct_ms(&st.hist, 50), p90 = hist_pct_ms(&st.hist, 90),
         p99 = hist_pct_ms(&st.hist, 99), max_ms = (double)st.hist.max_us / 1000;

  if (json) {
    printf("{\"url\":");
    json_str(url);
    printf(",\"connections\":%ld,\"streams\":%ld,\"threads\":%ld,\"duration_s\":%.3f,"
           "\"warmup_s\":%.3f,\"requests\":%" PRIu64 ",\"ok\":%" PRIu64 ",\"rps\":%.1f,"
           "\"errors\":%" PRIu64 ",\"errors_transfer\":%" PRIu64 ",\"errors_status\":%" PRIu64
           ",\"errors_body\":%" PRIu64 ",\"errors_proto\":%" PRIu64 ","
           "\"latency_ms\":{\"mean\":%.3f,\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f},"
           "\"body_bytes\":%" PRIu64 ",\"connects\":%" PRIu64 ",\"connections_used\":%" PRIu64
           ",\"client_cpu_pct\":%.1f,\"aborted\":%s,\"first_error\":",
           conns, streams, threads, elapsed, warmup, done, st.ok, rps, errors, st.err_transfer,
           st.err_status, st.err_body, st.err_proto, mean_ms, p50, p90, p99, max_ms, st.bytes,
           st.connects, st.conns_used, cpu_pct, aborted ? "true" : "false");
    if (aborted) json_str(abort_reason);
    else if (st.first_error[0]) json_str(st.first_error);
    else if (st.err_status) printf("\"HTTP status %ld\"", st.first_bad_status);
    else printf("null");
    printf(",\"libcurl\":");
    json_str(vi->version);
    printf(",\"tls\":");
    json_str(vi->ssl_version ? vi->ssl_version : "");
    printf(",\"quic\":");
    json_str(vi->quic_version ? vi->quic_version : "");
    printf("}\n");
  } else {
    printf("h3load %s: %ld connections x %ld streams, %ld thread%s, %.2fs measured "
           "(+%.2fs warmup)\n", url, conns, streams, threads, threads > 1 ? "s" : "",
           elapsed, warmup);
    printf("libcurl %s, %s, %s\n", vi->version, vi->ssl_version ? vi->ssl_version : "?",
           vi->quic_version ? vi->quic_version : "?");
    printf("requests: %" PRIu64 " done, %" PRIu64 " ok, %" PRIu64 " errors\n", done, st.ok,
           errors);
    printf("  errors: %" PRIu64 " transfer, %" PRIu64 " non-200, %" PRIu64
           " body length, %" PRIu64 " not HTTP/3\n",
           st.err_transfer, st.err_status, st.err_body, st.err_proto);
    if (aborted) printf("ABORTED on a fatal error: %s\n", abort_reason);
    else if (st.first_error[0]) printf("  first transfer error: %s\n", st.first_error);
    if (st.err_status) printf("  first non-200 status: %ld\n", st.first_bad_status);
    for (int c = 1; c <= CURL_LAST; c++)
      if (st.by_code[c])
        printf("  curl %d (%s): %" PRIu64 "\n", c,
               c < CURL_LAST ? curl_easy_strerror((CURLcode)c) : "other", st.by_code[c]);
    printf("req/s: %.1f\n", rps);
    printf("latency ms: mean %.3f  p50 %.3f  p90 %.3f  p99 %.3f  max %.3f\n", mean_ms, p50,
           p90, p99, max_ms);
    printf("body bytes: %" PRIu64 "\n", st.bytes);
    printf("connections: %" PRIu64 " used while measuring, %" PRIu64
           " opened in total (limit %ld)\n", st.conns_used, st.connects, conns);
    printf("client CPU: %.1f%% of one core\n", cpu_pct);
  }
  fflush(stdout);

  for (long t = 0; t < threads; t++) {
    worker_t *w = &ws[t];
    for (long i = 0; i < w->nslots; i++) {
      curl_multi_remove_handle(w->slots[i].g->multi, w->slots[i].easy);
      curl_easy_cleanup(w->slots[i].easy);
    }
    for (long i = 0; i < w->conns; i++) curl_multi_cleanup(w->groups[i].multi);
    free(w->groups);
    free(w->slots);
    free(w->pfds);
  }
  free(ws);
  curl_slist_free_all(headers);
  curl_global_cleanup();
  free(body);
  return aborted || !st.ok ? 1 : 0;
}
