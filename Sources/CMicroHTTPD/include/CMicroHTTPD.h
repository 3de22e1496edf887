// libmicrohttpd (libmicrohttpd-dev) plus wrappers for its variadic functions.
#ifndef CMICROHTTPD_H
#define CMICROHTTPD_H
#include <stdint.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <microhttpd.h>
#endif
