/* msquic_api: the subset of the MsQuic v2 C ABI (Linux) that engine_msquic.c uses.
 *
 * Declared here from MsQuic's documented API (its API reference and msquic.h, API
 * version 2) so that fpy3 builds without MsQuic's headers and loads libmsquic.so.2 at
 * run time. Only
 * what we call or read is named; the rest of each table or struct is padding of
 * the documented size. Layouts are the x86-64 / aarch64 LP64 ones.
 */
#ifndef FPY3_MSQUIC_API_H
#define FPY3_MSQUIC_API_H

#include <netinet/in.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/socket.h>

typedef struct mq_handle_s *mq_handle;
typedef unsigned int mq_status; /* QUIC_STATUS on POSIX: 0 ok, negative "soft", errno-ish > 0 */
typedef unsigned char mq_bool;

#define MQ_FAILED(s) ((int)(s) > 0)
#define MQ_STATUS_SUCCESS 0u
#define MQ_STATUS_PENDING ((mq_status)-2)
#define MQ_STATUS_CONNECTION_REFUSED 111u /* ECONNREFUSED */

#define MQ_API_VERSION_2 2

typedef union {
    struct sockaddr Ip;
    struct sockaddr_in Ipv4;
    struct sockaddr_in6 Ipv6;
} mq_addr; /* QUIC_ADDR */

typedef struct {
    uint32_t Length;
    uint8_t *Buffer;
} mq_buffer; /* QUIC_BUFFER */

typedef struct {
    const char *AppName;
    int ExecutionProfile; /* QUIC_EXECUTION_PROFILE: 0 low latency */
} mq_registration_config;

typedef struct {
    const char *PrivateKeyFile;
    const char *CertificateFile;
} mq_certificate_file;

#define MQ_CREDENTIAL_TYPE_CERTIFICATE_FILE 4
#define MQ_CREDENTIAL_FLAG_NONE 0

typedef struct {
    int Type;  /* QUIC_CREDENTIAL_TYPE */
    int Flags; /* QUIC_CREDENTIAL_FLAGS */
    mq_certificate_file *CertificateFile; /* a union of pointers in the ABI */
    const char *Principal;
    void *Reserved;
    void *AsyncHandler;
    int AllowedCipherSuites;
    const char *CaCertificateFile;
} mq_credential_config; /* QUIC_CREDENTIAL_CONFIG */

/* QUIC_SETTINGS: IsSetFlags bit n says field n (in declaration order) is set. */
#define MQ_SET_HANDSHAKE_IDLE_TIMEOUT (1ull << 1)
#define MQ_SET_IDLE_TIMEOUT (1ull << 2)
#define MQ_SET_STREAM_RECV_WINDOW (1ull << 6)
#define MQ_SET_CONN_FLOW_CONTROL_WINDOW (1ull << 8)
#define MQ_SET_PEER_BIDI_STREAM_COUNT (1ull << 18)
#define MQ_SET_PEER_UNIDI_STREAM_COUNT (1ull << 19)
#define MQ_SET_MAXIMUM_MTU (1ull << 23)
#define MQ_SET_SEND_BUFFERING (1ull << 24)
#define MQ_SET_STREAM_RECV_WINDOW_BIDI_REMOTE (1ull << 36)

typedef struct {
    uint64_t IsSetFlags;
    uint64_t MaxBytesPerKey;
    uint64_t HandshakeIdleTimeoutMs;
    uint64_t IdleTimeoutMs;
    uint64_t MtuDiscoverySearchCompleteTimeoutUs;
    uint32_t TlsClientMaxSendBuffer;
    uint32_t TlsServerMaxSendBuffer;
    uint32_t StreamRecvWindowDefault;
    uint32_t StreamRecvBufferDefault;
    uint32_t ConnFlowControlWindow;
    uint32_t MaxWorkerQueueDelayUs;
    uint32_t MaxStatelessOperations;
    uint32_t InitialWindowPackets;
    uint32_t SendIdleTimeoutMs;
    uint32_t InitialRttMs;
    uint32_t MaxAckDelayMs;
    uint32_t DisconnectTimeoutMs;
    uint32_t KeepAliveIntervalMs;
    uint16_t CongestionControlAlgorithm;
    uint16_t PeerBidiStreamCount;
    uint16_t PeerUnidiStreamCount;
    uint16_t MaxBindingStatelessOperations;
    uint16_t StatelessOperationExpirationMs;
    uint16_t MinimumMtu;
    uint16_t MaximumMtu;
    uint8_t SendBufferingEnabled : 1;
    uint8_t PacingEnabled : 1;
    uint8_t MigrationEnabled : 1;
    uint8_t DatagramReceiveEnabled : 1;
    uint8_t ServerResumptionLevel : 2;
    uint8_t GreaseQuicBitEnabled : 1;
    uint8_t EcnEnabled : 1;
    uint8_t MaxOperationsPerDrain;
    uint8_t MtuDiscoveryMissingProbeCount;
    uint32_t DestCidUpdateIdleTimeoutMs;
    uint64_t Flags;
    uint32_t StreamRecvWindowBidiLocalDefault;
    uint32_t StreamRecvWindowBidiRemoteDefault;
    uint32_t StreamRecvWindowUnidiDefault;
} mq_settings; /* QUIC_SETTINGS */

/* QUIC_GLOBAL_SETTINGS */
#define MQ_GSET_RETRY_MEMORY_LIMIT (1ull << 0)
#define MQ_GSET_LOAD_BALANCING_MODE (1ull << 1)
#define MQ_GSET_FIXED_SERVER_ID (1ull << 2)
#define MQ_LOAD_BALANCING_SERVER_ID_FIXED 2

typedef struct {
    uint64_t IsSetFlags;
    uint16_t RetryMemoryLimit;
    uint16_t LoadBalancingMode;
    uint32_t FixedServerID;
} mq_global_settings;

#define MQ_PARAM_GLOBAL_RETRY_MEMORY_PERCENT 0x01000000u    /* uint16_t */
#define MQ_PARAM_GLOBAL_LIBRARY_VERSION 0x01000004u         /* uint32_t[4] */
#define MQ_PARAM_GLOBAL_GLOBAL_SETTINGS 0x01000006u         /* mq_global_settings */
#define MQ_PARAM_GLOBAL_STATELESS_RESET_KEY 0x0100000Bu     /* uint8_t[32] */
#define MQ_PARAM_LISTENER_PARTITION_INDEX 0x04000005u       /* uint16_t (v2.6+) */
#define MQ_PARAM_CONN_CLOSE_ASYNC 0x0500001Au               /* uint8_t (v2.5+, preview) */
#define MQ_PARAM_STREAM_ID 0x08000000u                      /* uint64_t */

/* Application-driven execution (v2.5+, preview; Linux epoll builds). The app makes the
 * event queue (an epoll fd), MsQuic adds its sockets and wake-ups to it, and the app
 * runs MsQuic's work: ExecutionPoll, then each ready epoll entry's completion. */
typedef struct {
    int fd;
    void (*Completion)(struct epoll_event *cqe);
} mq_sqe; /* QUIC_SQE: what an epoll entry's data.ptr points at */

typedef struct {
    uint32_t IdealProcessor;
    int *EventQ; /* QUIC_EVENTQ *: the epoll fd */
} mq_execution_config; /* QUIC_EXECUTION_CONFIG */

typedef struct mq_execution_s mq_execution;

/* Listener events */
#define MQ_LISTENER_EVENT_NEW_CONNECTION 0
#define MQ_LISTENER_EVENT_STOP_COMPLETE 1

typedef struct {
    uint32_t QuicVersion;
    const mq_addr *LocalAddress;
    const mq_addr *RemoteAddress;
    /* more fields follow; not read */
} mq_new_connection_info;

typedef struct {
    int Type;
    union {
        struct {
            const mq_new_connection_info *Info;
            mq_handle Connection;
        } NEW_CONNECTION;
        uint8_t pad[16];
    };
} mq_listener_event;

/* Connection events */
#define MQ_CONN_EVENT_CONNECTED 0
#define MQ_CONN_EVENT_SHUTDOWN_INITIATED_BY_TRANSPORT 1
#define MQ_CONN_EVENT_SHUTDOWN_INITIATED_BY_PEER 2
#define MQ_CONN_EVENT_SHUTDOWN_COMPLETE 3
#define MQ_CONN_EVENT_PEER_ADDRESS_CHANGED 5
#define MQ_CONN_EVENT_PEER_STREAM_STARTED 6

typedef struct {
    int Type;
    union {
        struct {
            mq_handle Stream;
            int Flags; /* QUIC_STREAM_OPEN_FLAGS */
        } PEER_STREAM_STARTED;
        struct {
            const mq_addr *Address;
        } PEER_ADDRESS_CHANGED;
        uint8_t pad[24];
    };
} mq_connection_event;

/* Stream events */
#define MQ_STREAM_EVENT_START_COMPLETE 0
#define MQ_STREAM_EVENT_RECEIVE 1
#define MQ_STREAM_EVENT_SEND_COMPLETE 2
#define MQ_STREAM_EVENT_PEER_SEND_SHUTDOWN 3
#define MQ_STREAM_EVENT_PEER_SEND_ABORTED 4
#define MQ_STREAM_EVENT_PEER_RECEIVE_ABORTED 5
#define MQ_STREAM_EVENT_SHUTDOWN_COMPLETE 7

#define MQ_RECEIVE_FLAG_FIN 0x2

typedef struct {
    int Type;
    union {
        struct {
            mq_status Status;
            uint64_t ID;
            uint8_t PeerAccepted; /* bit 0 */
        } START_COMPLETE;
        struct {
            uint64_t AbsoluteOffset;
            uint64_t TotalBufferLength;
            const mq_buffer *Buffers;
            uint32_t BufferCount;
            int Flags; /* QUIC_RECEIVE_FLAGS */
        } RECEIVE;
        struct {
            mq_bool Canceled;
            void *ClientContext;
        } SEND_COMPLETE;
        struct {
            uint64_t ErrorCode;
        } PEER_SEND_ABORTED;
        struct {
            uint64_t ErrorCode;
        } PEER_RECEIVE_ABORTED;
        struct {
            mq_bool ConnectionShutdown;
            uint8_t Bits; /* AppCloseInProgress, ConnectionShutdownByApp, ConnectionClosedRemotely */
            uint64_t ConnectionErrorCode;
            mq_status ConnectionCloseStatus;
        } SHUTDOWN_COMPLETE;
        uint8_t pad[32];
    };
} mq_stream_event;

typedef mq_status (*mq_listener_cb)(mq_handle, void *, mq_listener_event *);
typedef mq_status (*mq_connection_cb)(mq_handle, void *, mq_connection_event *);
typedef mq_status (*mq_stream_cb)(mq_handle, void *, mq_stream_event *);

#define MQ_CONN_SHUTDOWN_FLAG_NONE 0
#define MQ_CONN_SHUTDOWN_FLAG_SILENT 1
#define MQ_STREAM_OPEN_FLAG_UNIDIRECTIONAL 1
#define MQ_STREAM_START_FLAG_IMMEDIATE 1
#define MQ_STREAM_SHUTDOWN_FLAG_ABORT_SEND 2
#define MQ_STREAM_SHUTDOWN_FLAG_ABORT_RECEIVE 4
#define MQ_SEND_FLAG_FIN 4

/* QUIC_API_TABLE, API version 2: the functions in declaration order. */
typedef struct {
    void (*SetContext)(mq_handle, void *);
    void *(*GetContext)(mq_handle);
    void (*SetCallbackHandler)(mq_handle, void *handler, void *ctx);
    mq_status (*SetParam)(mq_handle, uint32_t param, uint32_t len, const void *buf);
    mq_status (*GetParam)(mq_handle, uint32_t param, uint32_t *len, void *buf);
    mq_status (*RegistrationOpen)(const mq_registration_config *, mq_handle *);
    void (*RegistrationClose)(mq_handle);
    void (*RegistrationShutdown)(mq_handle, int flags, uint64_t error);
    mq_status (*ConfigurationOpen)(mq_handle reg, const mq_buffer *alpn, uint32_t nalpn,
                                   const mq_settings *, uint32_t settings_size, void *ctx,
                                   mq_handle *);
    void (*ConfigurationClose)(mq_handle);
    mq_status (*ConfigurationLoadCredential)(mq_handle, const mq_credential_config *);
    mq_status (*ListenerOpen)(mq_handle reg, mq_listener_cb, void *ctx, mq_handle *);
    void (*ListenerClose)(mq_handle);
    mq_status (*ListenerStart)(mq_handle, const mq_buffer *alpn, uint32_t nalpn, const mq_addr *);
    void (*ListenerStop)(mq_handle);
    void *ConnectionOpen;
    void (*ConnectionClose)(mq_handle);
    void (*ConnectionShutdown)(mq_handle, int flags, uint64_t error);
    void *ConnectionStart;
    mq_status (*ConnectionSetConfiguration)(mq_handle, mq_handle config);
    void *ConnectionSendResumptionTicket;
    mq_status (*StreamOpen)(mq_handle conn, int flags, mq_stream_cb, void *ctx, mq_handle *);
    void (*StreamClose)(mq_handle);
    mq_status (*StreamStart)(mq_handle, int flags);
    mq_status (*StreamShutdown)(mq_handle, int flags, uint64_t error);
    mq_status (*StreamSend)(mq_handle, const mq_buffer *, uint32_t n, int flags, void *ctx);
    void (*StreamReceiveComplete)(mq_handle, uint64_t len);
    mq_status (*StreamReceiveSetEnabled)(mq_handle, mq_bool);
    void *DatagramSend;
    void *ConnectionResumptionTicketValidationComplete; /* v2.2 */
    void *ConnectionCertificateValidationComplete;      /* v2.2 */
    void *ConnectionOpenInPartition;                    /* v2.5 */
    /* preview features, in the table of every build */
    void *StreamProvideReceiveBuffers;                  /* v2.5 */
    void *ConnectionPoolCreate;                         /* v2.5 */
    mq_status (*ExecutionCreate)(int flags, uint32_t polling_idle_us, uint32_t count,
                                 mq_execution_config *configs,
                                 mq_execution **executions); /* v2.5 */
    void (*ExecutionDelete)(uint32_t count, mq_execution **executions); /* v2.5 */
    uint32_t (*ExecutionPoll)(mq_execution *execution); /* v2.5: ms to its next timer */
    void (*RegistrationClose2)(mq_handle, void (*done)(void *ctx), void *ctx); /* v2.6 */
} mq_api;

typedef mq_status (*mq_open_version_fn)(uint32_t version, const void **api);

#endif
