/*
 * h2load_cert.c: lets h2load present a client certificate (it has no option for one).
 *
 * Every service requires mTLS, so the direct-to-worker throughput row must
 * present the edge's certificate, as the edge does. Loaded into h2load only
 * (LD_PRELOAD, see bench/edge.py `h2load_client_cert`), it wraps SSL_CTX_new:
 * each context h2load creates gets the certificate chain and key named by
 * TOKENMESH_BENCH_CLIENT_CERT and TOKENMESH_BENCH_CLIENT_KEY. Nothing else
 * changes: h2load's own TLS (OpenSSL, ALPN h2, its ciphers) does the rest.
 *
 * Build: cc -shared -fPIC -o h2load_cert.so h2load_cert.c -ldl
 * (no OpenSSL headers needed: the few declarations below are OpenSSL 3's stable ABI,
 * resolved against the libssl h2load itself loads).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_method_st SSL_METHOD;
#define SSL_FILETYPE_PEM 1
int SSL_CTX_use_certificate_chain_file(SSL_CTX *ctx, const char *file);
int SSL_CTX_use_PrivateKey_file(SSL_CTX *ctx, const char *file, int type);
int SSL_CTX_check_private_key(const SSL_CTX *ctx);

typedef SSL_CTX *(*ssl_ctx_new_fn)(const SSL_METHOD *);

SSL_CTX *SSL_CTX_new(const SSL_METHOD *method) {
    static ssl_ctx_new_fn real;
    if (real == NULL) {
        real = (ssl_ctx_new_fn)dlsym(RTLD_NEXT, "SSL_CTX_new");
        if (real == NULL) {
            fprintf(stderr, "h2load_cert: SSL_CTX_new not found\n");
            abort();
        }
    }
    SSL_CTX *ctx = real(method);
    const char *cert = getenv("TOKENMESH_BENCH_CLIENT_CERT");
    const char *key = getenv("TOKENMESH_BENCH_CLIENT_KEY");
    if (ctx == NULL || cert == NULL || key == NULL) {
        return ctx;
    }
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        fprintf(stderr, "h2load_cert: cannot load %s / %s\n", cert, key);
        abort();
    }
    return ctx;
}
