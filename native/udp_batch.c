/* udp_batch: see udp_batch.h. */
#define _GNU_SOURCE
#include "udp_batch.h"

#include <errno.h>
#include <netinet/udp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine_common.h"

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif

static int sockopt_on(int fd, int level, int name)
{
    int one = 1;
    return setsockopt(fd, level, name, &one, sizeof(one));
}

int fpy3_udp_init(fpy3_udp *u, int fd, char *err, size_t errlen)
{
    u->fd = fd;
    u->boundlen = sizeof(u->bound);
    if (getsockname(fd, (struct sockaddr *)&u->bound, &u->boundlen) < 0) {
        fpy3_seterr(err, errlen, "getsockname: %s", strerror(errno));
        return -1;
    }
    u->family = u->bound.ss_family;
    if (u->family != AF_INET && u->family != AF_INET6) {
        fpy3_seterr(err, errlen, "not an IPv4 or IPv6 socket");
        return -1;
    }
    int type = 0;
    socklen_t tl = sizeof(type);
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) < 0 || type != SOCK_DGRAM) {
        fpy3_seterr(err, errlen, "not a UDP socket");
        return -1;
    }
    /* Destination address and ECN of every datagram; IPv4 ones too on dual-stack. */
    if (u->family == AF_INET6) {
        sockopt_on(fd, IPPROTO_IPV6, IPV6_RECVPKTINFO);
        sockopt_on(fd, IPPROTO_IPV6, IPV6_RECVTCLASS);
    }
    sockopt_on(fd, IPPROTO_IP, IP_PKTINFO);
    sockopt_on(fd, IPPROTO_IP, IP_RECVTOS);
    int gso = 0;
    socklen_t gl = sizeof(gso);
    u->gso = getsockopt(fd, SOL_UDP, UDP_SEGMENT, &gso, &gl) == 0;
    const char *force = getenv("FPY3_NO_GSO"); /* testing the fallback */
    if (force && force[0] == '1')
        u->gso = 0;

    u->rxbuf = malloc((size_t)FPY3_UDP_RX_BATCH * FPY3_UDP_RX_BUFSZ);
    u->txbuf = malloc(FPY3_UDP_TX_BUFSZ);
    if (!u->rxbuf || !u->txbuf) {
        fpy3_seterr(err, errlen, "out of memory");
        return -1;
    }
    for (int i = 0; i < FPY3_UDP_RX_BATCH; i++) {
        u->rxiov[i].iov_base = u->rxbuf + (size_t)i * FPY3_UDP_RX_BUFSZ;
        u->rxiov[i].iov_len = FPY3_UDP_RX_BUFSZ;
        u->rxmsg[i].msg_hdr.msg_iov = &u->rxiov[i];
        u->rxmsg[i].msg_hdr.msg_iovlen = 1;
        u->rxmsg[i].msg_hdr.msg_name = &u->rxaddr[i];
        u->rxmsg[i].msg_hdr.msg_control = u->rxctrl[i];
    }
    return 0;
}

void fpy3_udp_free(fpy3_udp *u)
{
    free(u->rxbuf);
    free(u->txbuf);
    u->rxbuf = u->txbuf = NULL;
}

/* --- receive ------------------------------------------------------------------------ */

int fpy3_udp_recv(fpy3_udp *u)
{
    for (int i = 0; i < FPY3_UDP_RX_BATCH; i++) {
        u->rxmsg[i].msg_hdr.msg_namelen = sizeof(u->rxaddr[i]);
        u->rxmsg[i].msg_hdr.msg_controllen = FPY3_UDP_RX_CTRLSZ;
        u->rxmsg[i].msg_hdr.msg_flags = 0;
    }
    int n;
    do
        n = recvmmsg(u->fd, u->rxmsg, FPY3_UDP_RX_BATCH, MSG_DONTWAIT, NULL);
    while (n < 0 && errno == EINTR);
    return n < 0 ? 0 : n; /* EAGAIN, or an error the next readiness shows again */
}

/* Destination address and ECN bits from a received message's control data. */
static void parse_cmsgs(const fpy3_udp *u, struct msghdr *h, fpy3_datagram *d)
{
    d->ecn = 0;
    memcpy(&d->local, &u->bound, u->boundlen);
    d->locallen = u->boundlen;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(h); cm; cm = CMSG_NXTHDR(h, cm)) {
        if (cm->cmsg_level == IPPROTO_IP && cm->cmsg_type == IP_PKTINFO) {
            struct in_pktinfo pi;
            memcpy(&pi, CMSG_DATA(cm), sizeof(pi));
            if (u->family == AF_INET) {
                struct sockaddr_in *sin = (struct sockaddr_in *)&d->local;
                sin->sin_addr = pi.ipi_addr;
            } else {
                /* IPv4 on a dual-stack socket: the v4-mapped form, like the peer's. */
                struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&d->local;
                memset(&sin6->sin6_addr, 0, sizeof(sin6->sin6_addr));
                sin6->sin6_addr.s6_addr[10] = sin6->sin6_addr.s6_addr[11] = 0xff;
                memcpy(&sin6->sin6_addr.s6_addr[12], &pi.ipi_addr, 4);
            }
        } else if (cm->cmsg_level == IPPROTO_IPV6 && cm->cmsg_type == IPV6_PKTINFO) {
            struct in6_pktinfo pi;
            memcpy(&pi, CMSG_DATA(cm), sizeof(pi));
            struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&d->local;
            sin6->sin6_addr = pi.ipi6_addr;
            if (IN6_IS_ADDR_LINKLOCAL(&pi.ipi6_addr))
                sin6->sin6_scope_id = pi.ipi6_ifindex;
        } else if (cm->cmsg_level == IPPROTO_IP && cm->cmsg_type == IP_TOS) {
            d->ecn = *(uint8_t *)CMSG_DATA(cm) & 0x3; /* a byte for IPv4 */
        } else if (cm->cmsg_level == IPPROTO_IPV6 && cm->cmsg_type == IPV6_TCLASS) {
            int v;
            memcpy(&v, CMSG_DATA(cm), sizeof(v));
            d->ecn = (uint32_t)v & 0x3;
        }
    }
}

int fpy3_udp_datagram(fpy3_udp *u, int i, fpy3_datagram *d)
{
    struct msghdr *h = &u->rxmsg[i].msg_hdr;
    if (h->msg_flags & MSG_TRUNC)
        return -1;
    d->data = u->rxiov[i].iov_base;
    d->len = u->rxmsg[i].msg_len;
    d->remote = (struct sockaddr *)&u->rxaddr[i];
    d->remotelen = h->msg_namelen;
    parse_cmsgs(u, h, d);
    return 0;
}

/* --- send --------------------------------------------------------------------------- */

static int is_v4mapped(const struct sockaddr *sa)
{
    return sa->sa_family == AF_INET6 &&
           IN6_IS_ADDR_V4MAPPED(&((const struct sockaddr_in6 *)sa)->sin6_addr);
}

/* Fills msg i's header and control data: source address, GSO segment size, ECN. */
static void tx_fill(fpy3_udp *u, uint32_t i, uint8_t *data, size_t len, size_t seg,
                    const struct sockaddr *remote, socklen_t remotelen,
                    const struct sockaddr *local, uint32_t ecn)
{
    struct msghdr *h = &u->txmsg[i].msg_hdr;
    memcpy(&u->txaddr[i], remote, remotelen);
    u->txiov[i].iov_base = data;
    u->txiov[i].iov_len = len;
    h->msg_name = &u->txaddr[i];
    h->msg_namelen = remotelen;
    h->msg_iov = &u->txiov[i];
    h->msg_iovlen = 1;
    h->msg_control = u->txctrl[i];
    h->msg_controllen = sizeof(u->txctrl[i]);
    h->msg_flags = 0;
    memset(u->txctrl[i], 0, sizeof(u->txctrl[i]));
    struct cmsghdr *cm = CMSG_FIRSTHDR(h);
    size_t clen = 0;
    if (local && local->sa_family == AF_INET) {
        struct in_pktinfo pi = {.ipi_spec_dst = ((const struct sockaddr_in *)local)->sin_addr};
        cm->cmsg_level = IPPROTO_IP;
        cm->cmsg_type = IP_PKTINFO;
        cm->cmsg_len = CMSG_LEN(sizeof(pi));
        memcpy(CMSG_DATA(cm), &pi, sizeof(pi));
        clen += CMSG_SPACE(sizeof(pi));
        cm = CMSG_NXTHDR(h, cm);
    } else if (local && local->sa_family == AF_INET6) {
        struct in6_pktinfo pi = {.ipi6_addr = ((const struct sockaddr_in6 *)local)->sin6_addr};
        cm->cmsg_level = IPPROTO_IPV6;
        cm->cmsg_type = IPV6_PKTINFO;
        cm->cmsg_len = CMSG_LEN(sizeof(pi));
        memcpy(CMSG_DATA(cm), &pi, sizeof(pi));
        clen += CMSG_SPACE(sizeof(pi));
        cm = CMSG_NXTHDR(h, cm);
    }
    if (len > seg) {
        uint16_t n = (uint16_t)seg;
        cm->cmsg_level = SOL_UDP;
        cm->cmsg_type = UDP_SEGMENT;
        cm->cmsg_len = CMSG_LEN(sizeof(n));
        memcpy(CMSG_DATA(cm), &n, sizeof(n));
        clen += CMSG_SPACE(sizeof(n));
        cm = CMSG_NXTHDR(h, cm);
    }
    if (ecn && !u->no_ecn) {
        int v = (int)ecn;
        /* v4-mapped peers go out through the IPv4 stack, which reads IP_TOS. */
        int v6 = remote->sa_family == AF_INET6 && !is_v4mapped(remote);
        cm->cmsg_level = v6 ? IPPROTO_IPV6 : IPPROTO_IP;
        cm->cmsg_type = v6 ? IPV6_TCLASS : IP_TOS;
        cm->cmsg_len = CMSG_LEN(sizeof(v));
        memcpy(CMSG_DATA(cm), &v, sizeof(v));
        clen += CMSG_SPACE(sizeof(v));
    }
    h->msg_controllen = clen;
    if (!clen)
        h->msg_control = NULL;
    u->txseg[i] = (uint16_t)seg;
    u->txecn[i] = (uint8_t)ecn;
}

/* sendmsg one packet at a time (GSO refused or ECN refused). */
static int tx_send_split(fpy3_udp *u, uint32_t i)
{
    struct msghdr *h = &u->txmsg[i].msg_hdr;
    uint8_t *p = u->txiov[i].iov_base;
    size_t left = u->txiov[i].iov_len, seg = u->txseg[i];
    /* Rebuild the msg per packet without GSO; the source address is in txctrl. */
    struct sockaddr_storage remote = u->txaddr[i];
    socklen_t remotelen = h->msg_namelen;
    struct sockaddr_storage local = {0};
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(h); cm; cm = CMSG_NXTHDR(h, cm)) {
        if (cm->cmsg_level == IPPROTO_IP && cm->cmsg_type == IP_PKTINFO) {
            struct in_pktinfo pi;
            memcpy(&pi, CMSG_DATA(cm), sizeof(pi));
            struct sockaddr_in *sin = (struct sockaddr_in *)&local;
            sin->sin_family = AF_INET;
            sin->sin_addr = pi.ipi_spec_dst;
        } else if (cm->cmsg_level == IPPROTO_IPV6 && cm->cmsg_type == IPV6_PKTINFO) {
            struct in6_pktinfo pi;
            memcpy(&pi, CMSG_DATA(cm), sizeof(pi));
            struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&local;
            sin6->sin6_family = AF_INET6;
            sin6->sin6_addr = pi.ipi6_addr;
        }
    }
    const struct sockaddr *la = local.ss_family ? (const struct sockaddr *)&local : NULL;
    uint32_t ecn = u->txecn[i];
    while (left) {
        size_t n = left < seg ? left : seg;
        tx_fill(u, i, p, n, n, (struct sockaddr *)&remote, remotelen, la, ecn);
        ssize_t rv;
        do
            rv = sendmsg(u->fd, &u->txmsg[i].msg_hdr, 0);
        while (rv < 0 && errno == EINTR);
        if (rv < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            /* Keep the unsent rest as msg i. */
            tx_fill(u, i, p, left, seg, (struct sockaddr *)&remote, remotelen, la, ecn);
            return -1;
        }
        p += n;
        left -= n;
    }
    return 0;
}

int fpy3_udp_send(fpy3_udp *u)
{
    while (u->ntx_sent < u->ntx) {
        int rv = sendmmsg(u->fd, &u->txmsg[u->ntx_sent], u->ntx - u->ntx_sent, 0);
        if (rv > 0) {
            u->ntx_sent += (uint32_t)rv;
            continue;
        }
        if (rv < 0 && errno == EINTR)
            continue;
        if (rv < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            u->blocked = 1;
            return -1;
        }
        uint32_t i = u->ntx_sent;
        if (rv < 0 && errno == EIO && u->gso && u->txiov[i].iov_len > u->txseg[i]) {
            u->gso = 0; /* the device cannot segment: one packet per send from now on */
            if (tx_send_split(u, i) < 0) {
                u->blocked = 1;
                return -1;
            }
        } else if (rv < 0 && errno == EINVAL && !u->no_ecn && u->txecn[i]) {
            u->no_ecn = 1; /* a kernel refusing the TOS cmsg: send without ECN */
            if (tx_send_split(u, i) < 0) {
                u->blocked = 1;
                return -1;
            }
        }
        /* Any other error drops this msg, as the network could have. */
        u->ntx_sent++;
    }
    u->ntx = u->ntx_sent = 0;
    u->txlen = 0;
    u->blocked = 0;
    return 0;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int fpy3_udp_send_wait(fpy3_udp *u, int timeout_ms)
{
    int64_t deadline = mono_ms() + timeout_ms;
    for (;;) {
        if (fpy3_udp_send(u) == 0)
            return 0;
        int64_t left = deadline - mono_ms();
        if (left <= 0)
            return -1;
        struct pollfd p = {.fd = u->fd, .events = POLLOUT};
        if (poll(&p, 1, (int)left) < 0 && errno != EINTR)
            return -1;
    }
}

void fpy3_udp_commit(fpy3_udp *u, size_t len, size_t seg, const struct sockaddr *remote,
                     socklen_t remotelen, const struct sockaddr *local, uint32_t ecn)
{
    uint8_t *p = u->txbuf + u->txlen;
    u->txlen += len;
    if (u->gso || len <= seg) {
        tx_fill(u, u->ntx++, p, len, seg, remote, remotelen, local, ecn);
        return;
    }
    while (len) {
        size_t n = len < seg ? len : seg;
        tx_fill(u, u->ntx++, p, n, n, remote, remotelen, local, ecn);
        p += n;
        len -= n;
    }
}
