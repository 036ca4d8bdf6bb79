/* Development certificate with GnuTLS. See devcert.h for the ownership rule. */
#include "devcert.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>

#include <gnutls/abstract.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

static int fail(char *err, size_t errlen, const char *what, int rc) {
    if (err != NULL && errlen > 0)
        snprintf(err, errlen, "%s: %s", what, gnutls_strerror(rc));
    return rc;
}

/* Run a GnuTLS call; on error record which one and leave through `out`. */
#define TRY(call)                                        \
    do {                                                 \
        rc = (call);                                     \
        if (rc < 0) {                                    \
            fail(err, errlen, #call, rc);                \
            goto out;                                    \
        }                                                \
    } while (0)

int fpy3_devcert_generate(int64_t not_before, int64_t not_after,
                          char *cert_pem, size_t *cert_len,
                          char *key_pem, size_t *key_len,
                          char *err, size_t errlen) {
    static const char cn[] = "fpy3 development certificate";
    static const char org[] = "fpy3";
    static const char dns[] = "localhost";
    static const unsigned char ip4[4] = {127, 0, 0, 1};
    static const unsigned char ip6[16] = {[15] = 1};
    gnutls_x509_privkey_t key = NULL;
    gnutls_x509_crt_t crt = NULL;
    unsigned char serial[16];
    unsigned char keyid[64];
    size_t keyid_len = sizeof keyid;
    int rc;

    if (err != NULL && errlen > 0)
        err[0] = '\0';
    TRY(gnutls_x509_privkey_init(&key));
    TRY(gnutls_x509_privkey_generate2(key, GNUTLS_PK_ECDSA,
                                      GNUTLS_CURVE_TO_BITS(GNUTLS_ECC_CURVE_SECP256R1),
                                      0, NULL, 0));
    TRY(gnutls_x509_crt_init(&crt));
    TRY(gnutls_x509_crt_set_version(crt, 3));
    TRY(gnutls_rnd(GNUTLS_RND_NONCE, serial, sizeof serial));
    /* Top bit clear keeps the DER INTEGER positive; bit 6 set keeps it 16
     * bytes long (no leading zero octet to strip). */
    serial[0] = (serial[0] & 0x7f) | 0x40;
    TRY(gnutls_x509_crt_set_serial(crt, serial, sizeof serial));
    TRY(gnutls_x509_crt_set_activation_time(crt, (time_t)not_before));
    TRY(gnutls_x509_crt_set_expiration_time(crt, (time_t)not_after));
    TRY(gnutls_x509_crt_set_dn_by_oid(crt, GNUTLS_OID_X520_ORGANIZATION_NAME, 0, org,
                                      sizeof org - 1));
    TRY(gnutls_x509_crt_set_dn_by_oid(crt, GNUTLS_OID_X520_COMMON_NAME, 0, cn,
                                      sizeof cn - 1));
    TRY(gnutls_x509_crt_set_key(crt, key));
    TRY(gnutls_x509_crt_set_subject_alt_name(crt, GNUTLS_SAN_DNSNAME, dns, sizeof dns - 1,
                                             GNUTLS_FSAN_SET));
    TRY(gnutls_x509_crt_set_subject_alt_name(crt, GNUTLS_SAN_IPADDRESS, ip4, sizeof ip4,
                                             GNUTLS_FSAN_APPEND));
    TRY(gnutls_x509_crt_set_subject_alt_name(crt, GNUTLS_SAN_IPADDRESS, ip6, sizeof ip6,
                                             GNUTLS_FSAN_APPEND));
    /* A leaf, not a CA: OpenSSL (Python ssl, curl) and GnuTLS both accept a
     * self-signed leaf as its own trust anchor when it is in the CA file. */
    TRY(gnutls_x509_crt_set_basic_constraints(crt, 0, -1));
    TRY(gnutls_x509_crt_set_key_usage(crt, GNUTLS_KEY_DIGITAL_SIGNATURE));
    TRY(gnutls_x509_crt_set_key_purpose_oid(crt, GNUTLS_KP_TLS_WWW_SERVER, 0));
    TRY(gnutls_x509_crt_get_key_id(crt, 0, keyid, &keyid_len));
    TRY(gnutls_x509_crt_set_subject_key_id(crt, keyid, keyid_len));
    TRY(gnutls_x509_crt_set_authority_key_id(crt, keyid, keyid_len));
    /* Issuer == subject: signing with itself copies the subject DN as issuer. */
    TRY(gnutls_x509_crt_sign2(crt, crt, key, GNUTLS_DIG_SHA256, 0));
    TRY(gnutls_x509_crt_export(crt, GNUTLS_X509_FMT_PEM, cert_pem, cert_len));
    /* PKCS#8 ("BEGIN PRIVATE KEY"): what OpenSSL and GnuTLS loaders all take. */
    TRY(gnutls_x509_privkey_export_pkcs8(key, GNUTLS_X509_FMT_PEM, NULL, GNUTLS_PKCS_PLAIN,
                                         key_pem, key_len));
    rc = 0;
out:
    if (crt != NULL)
        gnutls_x509_crt_deinit(crt);
    if (key != NULL)
        gnutls_x509_privkey_deinit(key); /* wipes the key material */
    return rc;
}

static int import_crt(gnutls_x509_crt_t *crt, const char *pem, size_t len, char *err,
                      size_t errlen) {
    gnutls_datum_t d = {(unsigned char *)pem, (unsigned int)len};
    int rc;
    if (len > UINT_MAX)
        return fail(err, errlen, "certificate", GNUTLS_E_INVALID_REQUEST);
    rc = gnutls_x509_crt_init(crt);
    if (rc < 0)
        return fail(err, errlen, "gnutls_x509_crt_init", rc);
    rc = gnutls_x509_crt_import(*crt, &d, GNUTLS_X509_FMT_PEM);
    if (rc < 0)
        return fail(err, errlen, "certificate", rc);
    return 0;
}

int fpy3_devcert_check(const char *cert_pem, size_t cert_len,
                       const char *key_pem, size_t key_len,
                       int64_t *not_before, int64_t *not_after,
                       char *err, size_t errlen) {
    gnutls_x509_crt_t crt = NULL;
    gnutls_x509_privkey_t key = NULL;
    unsigned char cid[64], kid[64];
    size_t cid_len = sizeof cid, kid_len = sizeof kid;
    time_t t;
    int rc;

    if (err != NULL && errlen > 0)
        err[0] = '\0';
    if ((rc = import_crt(&crt, cert_pem, cert_len, err, errlen)) < 0)
        goto out;
    if ((t = gnutls_x509_crt_get_activation_time(crt)) == (time_t)-1) {
        rc = fail(err, errlen, "certificate notBefore", GNUTLS_E_CERTIFICATE_ERROR);
        goto out;
    }
    *not_before = (int64_t)t;
    if ((t = gnutls_x509_crt_get_expiration_time(crt)) == (time_t)-1) {
        rc = fail(err, errlen, "certificate notAfter", GNUTLS_E_CERTIFICATE_ERROR);
        goto out;
    }
    *not_after = (int64_t)t;
    if (key_pem != NULL) {
        gnutls_datum_t d = {(unsigned char *)key_pem, (unsigned int)key_len};
        if (key_len > UINT_MAX) {
            rc = fail(err, errlen, "private key", GNUTLS_E_INVALID_REQUEST);
            goto out;
        }
        TRY(gnutls_x509_privkey_init(&key));
        rc = gnutls_x509_privkey_import2(key, &d, GNUTLS_X509_FMT_PEM, NULL, 0);
        if (rc < 0) {
            fail(err, errlen, "private key", rc);
            goto out;
        }
        TRY(gnutls_x509_crt_get_key_id(crt, GNUTLS_KEYID_USE_SHA256, cid, &cid_len));
        TRY(gnutls_x509_privkey_get_key_id(key, GNUTLS_KEYID_USE_SHA256, kid, &kid_len));
        if (cid_len != kid_len || memcmp(cid, kid, cid_len) != 0) {
            rc = fail(err, errlen, "private key", GNUTLS_E_CERTIFICATE_KEY_MISMATCH);
            goto out;
        }
    }
    rc = 0;
out:
    if (key != NULL)
        gnutls_x509_privkey_deinit(key);
    if (crt != NULL)
        gnutls_x509_crt_deinit(crt);
    return rc;
}

int fpy3_devcert_spki_sha256(const char *cert_pem, size_t cert_len,
                             unsigned char *out, char *err, size_t errlen) {
    gnutls_x509_crt_t crt = NULL;
    gnutls_pubkey_t pub = NULL;
    gnutls_datum_t spki = {NULL, 0};
    int rc;

    if (err != NULL && errlen > 0)
        err[0] = '\0';
    if ((rc = import_crt(&crt, cert_pem, cert_len, err, errlen)) < 0)
        goto out;
    TRY(gnutls_pubkey_init(&pub));
    TRY(gnutls_pubkey_import_x509(pub, crt, 0));
    /* DER of the SubjectPublicKeyInfo; GnuTLS allocates it, freed below. */
    TRY(gnutls_pubkey_export2(pub, GNUTLS_X509_FMT_DER, &spki));
    TRY(gnutls_hash_fast(GNUTLS_DIG_SHA256, spki.data, spki.size, out));
    rc = 0;
out:
    gnutls_free(spki.data);
    if (pub != NULL)
        gnutls_pubkey_deinit(pub);
    if (crt != NULL)
        gnutls_x509_crt_deinit(crt);
    return rc;
}
