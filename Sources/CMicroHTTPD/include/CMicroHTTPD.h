// libmicrohttpd (libmicrohttpd-dev) plus wrappers for its variadic functions.
#ifndef CMICROHTTPD_H
#define CMICROHTTPD_H
#include <stdint.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <microhttpd.h>

// Calls MHD_start_daemon, whose options are C varargs that Swift cannot pass. The logger goes
// first because MHD prints messages about the options before it to stderr. The callbacks go
// here with their C types, and the other options (socket address, thread pool size, timeout)
// go in `options`, an MHD_OPTION_END-terminated array that MHD reads only during the call.
struct MHD_Daemon *cmhd_start_daemon(unsigned int flags,
                                     uint16_t port,
                                     MHD_LogCallback logger,
                                     void *logger_context,
                                     MHD_AccessHandlerCallback handler,
                                     void *handler_context,
                                     MHD_RequestCompletedCallback completed,
                                     void *completed_context,
                                     const struct MHD_OptionItem *options);

// Calls MHD_get_daemon_info, which is variadic, for the info types that take no extra argument.
const union MHD_DaemonInfo *cmhd_get_daemon_info(struct MHD_Daemon *daemon,
                                                 enum MHD_DaemonInfoType info_type);

#endif
