/* Development certificate: a self-signed ECDSA P-256 cert for localhost.
 *
 * Ownership: every output goes into a buffer the caller owns. PEM outputs take
 * (buf, *len): *len is the capacity on entry and the bytes written on return
 * (no NUL added). If a buffer is too small the call fails with
 * GNUTLS_E_SHORT_MEMORY_BUFFER and *len holds the size needed.
 * Errors: 0 on success, else a negative GnuTLS error code, with a message
 * (NUL-terminated, truncated to errlen) in err when err is not NULL. */
#ifndef FPY3_DEVCERT_H
#define FPY3_DEVCERT_H

#include <stddef.h>
#include <stdint.h>

/* Comfortably above the ~700-byte cert and ~250-byte key PEMs. */
#define FPY3_DEVCERT_PEM_MAX 8192

/* New key and cert valid from not_before to not_after (unix seconds). */
int fpy3_devcert_generate(int64_t not_before, int64_t not_after,
                          char *cert_pem, size_t *cert_len,
                          char *key_pem, size_t *key_len,
                          char *err, size_t errlen);

/* Parse a PEM cert and give its validity window. If key_pem is not NULL, also
 * parse the PEM key and fail with GNUTLS_E_CERTIFICATE_KEY_MISMATCH unless it
 * belongs to the cert. */
int fpy3_devcert_check(const char *cert_pem, size_t cert_len,
                       const char *key_pem, size_t key_len,
                       int64_t *not_before, int64_t *not_after,
                       char *err, size_t errlen);

/* SHA-256 of the DER SubjectPublicKeyInfo of a PEM cert into out[32]
 * (what Chromium's --ignore-certificate-errors-spki-list wants, base64'd). */
int fpy3_devcert_spki_sha256(const char *cert_pem, size_t cert_len,
                             unsigned char *out, char *err, size_t errlen);

#endif
