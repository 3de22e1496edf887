// libcurl (libcurl4-openssl-dev) plus wrappers for curl_easy_setopt and curl_easy_getinfo,
// which are variadic.
#ifndef CCURL_H
#define CCURL_H
#include <curl/curl.h>
#endif
