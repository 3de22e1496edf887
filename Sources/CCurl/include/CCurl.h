// libcurl (libcurl4-openssl-dev) plus wrappers for curl_easy_setopt and curl_easy_getinfo,
// which are variadic.
#ifndef CCURL_H
#define CCURL_H
#include <curl/curl.h>

// Swift cannot call C variadic functions, so each wrapper below fixes the type of the one
// argument that curl_easy_setopt or curl_easy_getinfo takes after the option. They add no logic.

// Sets an option whose argument is a long (CURLOPT_TIMEOUT_MS, CURLOPT_HTTPGET, ...).
CURLcode ccurl_setopt_long(CURL *handle, CURLoption option, long value);

// Sets an option whose argument is a curl_off_t (CURLOPT_POSTFIELDSIZE_LARGE).
CURLcode ccurl_setopt_off_t(CURL *handle, CURLoption option, curl_off_t value);

// Sets an option whose argument is a C string; libcurl copies it (CURLOPT_URL, ...).
CURLcode ccurl_setopt_string(CURL *handle, CURLoption option, const char *value);

// Sets an option whose argument is an object pointer (CURLOPT_POSTFIELDS, CURLOPT_WRITEDATA,
// CURLOPT_HTTPHEADER, ...). libcurl does not copy what it points to.
CURLcode ccurl_setopt_pointer(CURL *handle, CURLoption option, void *value);

// Sets CURLOPT_WRITEFUNCTION or CURLOPT_HEADERFUNCTION, whose callbacks share the
// curl_write_callback type. A function pointer is passed apart from object pointers because
// C does not let the two convert into each other.
CURLcode ccurl_setopt_write_function(CURL *handle, CURLoption option,
                                     curl_write_callback callback);

// Reads information whose result is a long (CURLINFO_RESPONSE_CODE, CURLINFO_NUM_CONNECTS, ...).
CURLcode ccurl_getinfo_long(CURL *handle, CURLINFO info, long *value);

#endif
