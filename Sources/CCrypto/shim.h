// SHA-1 and SHA-256 one-shot digests from OpenSSL's libcrypto (libssl-dev).
#include <openssl/sha.h>
