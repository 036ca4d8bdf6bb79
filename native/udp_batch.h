/* udp_batch: batched UDP I/O on one non-blocking socket, for a QUIC server.
 *
 * Receive: recvmmsg into FPY3_UDP_RX_BATCH buffers; each datagram comes with its
 * destination address (IP_PKTINFO / IPV6_PKTINFO: the right source for replies on
 * a wildcard bind) and its ECN bits (IP_TOS / IPV6_TCLASS).
 *
 * Send: packets are written in place into one buffer (fpy3_udp_reserve, then
 * fpy3_udp_commit) and queued as sendmmsg messages. A run of packets of one size to
 * one peer is one message with UDP GSO when the kernel takes it. Each message
 * carries its source address and ECN codepoint as control data. A device that
 * cannot segment (EIO) turns GSO off, a kernel refusing the TOS cmsg (EINVAL) turns
 * ECN off, for the life of the socket; other send errors drop the message, as the
 * network could have. EAGAIN keeps the rest queued until the socket is writable.
 *
 * The including file defines _GNU_SOURCE before any system header (struct mmsghdr).
 * Loop thread only; internal to the engines.
 */
#ifndef FPY3_UDP_BATCH_H
#define FPY3_UDP_BATCH_H

#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define FPY3_UDP_RX_BATCH 64
#define FPY3_UDP_RX_BUFSZ 2048 /* also the largest UDP payload we accept */
#define FPY3_UDP_RX_CTRLSZ 128
#define FPY3_UDP_TX_BUFSZ (1 << 20)
#define FPY3_UDP_TX_MAXMSG 512
#define FPY3_UDP_TX_CTRLSZ                                                                         \
    (CMSG_SPACE(sizeof(struct in6_pktinfo)) + CMSG_SPACE(sizeof(uint16_t)) +                       \
     CMSG_SPACE(sizeof(int)))
#define FPY3_UDP_GSO_MAX_BYTES 65000 /* below the 64 KiB IP limit with headers */
#define FPY3_UDP_GSO_MAX_SEGS 64     /* the kernel's UDP_MAX_SEGMENTS */

typedef struct {
    int fd, family;
    struct sockaddr_storage bound; /* getsockname: the local address of datagrams */
    socklen_t boundlen;
    int gso, no_ecn;

    /* receive batch; rxbuf is owned here, RX_BATCH buffers of RX_BUFSZ */
    uint8_t *rxbuf;
    struct mmsghdr rxmsg[FPY3_UDP_RX_BATCH];
    struct iovec rxiov[FPY3_UDP_RX_BATCH];
    struct sockaddr_storage rxaddr[FPY3_UDP_RX_BATCH];
    uint8_t rxctrl[FPY3_UDP_RX_BATCH][FPY3_UDP_RX_CTRLSZ];

    /* send batch; txbuf is owned here: packets are written in place, one msg per
     * GSO run */
    uint8_t *txbuf;
    size_t txlen;
    uint32_t ntx, ntx_sent;
    int blocked; /* EAGAIN: the rest waits for writability */
    struct mmsghdr txmsg[FPY3_UDP_TX_MAXMSG];
    struct iovec txiov[FPY3_UDP_TX_MAXMSG];
    struct sockaddr_storage txaddr[FPY3_UDP_TX_MAXMSG];
    uint8_t txctrl[FPY3_UDP_TX_MAXMSG][FPY3_UDP_TX_CTRLSZ];
    uint16_t txseg[FPY3_UDP_TX_MAXMSG]; /* segment size (== len when one packet) */
    uint8_t txecn[FPY3_UDP_TX_MAXMSG];
} fpy3_udp;

/* One received datagram; data and remote point into the batch, valid until the
 * next fpy3_udp_recv. */
typedef struct {
    uint8_t *data;
    size_t len;
    struct sockaddr *remote;
    socklen_t remotelen;
    struct sockaddr_storage local;
    socklen_t locallen;
    uint32_t ecn;
} fpy3_datagram;

/* fd: a bound, non-blocking UDP socket (never closed here). Checks it, turns on
 * pktinfo and TOS/TCLASS reception, probes GSO (FPY3_NO_GSO=1 turns it off for
 * tests). 0, or -1 with the reason in err. */
int fpy3_udp_init(fpy3_udp *u, int fd, char *err, size_t errlen);
void fpy3_udp_free(fpy3_udp *u);

/* One recvmmsg: the number of datagrams received (0: none or an error the next
 * readiness shows again). */
int fpy3_udp_recv(fpy3_udp *u);
/* Datagram i of the last receive: 0, or -1 when it was truncated. */
int fpy3_udp_datagram(fpy3_udp *u, int i, fpy3_datagram *d);

/* Sends what is queued: 0 when all went (or was dropped), -1 when blocked. */
int fpy3_udp_send(fpy3_udp *u);
/* As fpy3_udp_send, then while blocked waits for writability, up to timeout_ms. */
int fpy3_udp_send_wait(fpy3_udp *u, int timeout_ms);

/* Room for need bytes and a GSO run's worth of msgs at fpy3_udp_reserve's return;
 * NULL while blocked. */
static inline uint8_t *fpy3_udp_reserve(fpy3_udp *u, size_t need)
{
    if (u->blocked)
        return NULL;
    if (u->txlen + need > FPY3_UDP_TX_BUFSZ ||
        u->ntx + FPY3_UDP_GSO_MAX_SEGS + 1 > FPY3_UDP_TX_MAXMSG) {
        if (fpy3_udp_send(u) < 0)
            return NULL;
    }
    return u->txbuf + u->txlen;
}

/* Queues len bytes written at the reserved place: packets of seg bytes (the last
 * may be shorter) from local (NULL: the kernel picks) to remote, with ECN bits. */
void fpy3_udp_commit(fpy3_udp *u, size_t len, size_t seg, const struct sockaddr *remote,
                     socklen_t remotelen, const struct sockaddr *local, uint32_t ecn);

static inline int fpy3_udp_pending(const fpy3_udp *u) { return u->ntx > u->ntx_sent; }

#endif
