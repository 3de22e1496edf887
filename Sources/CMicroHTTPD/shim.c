#include "CMicroHTTPD.h"

struct MHD_Daemon *cmhd_start_daemon(unsigned int flags,
                                     uint16_t port,
                                     MHD_LogCallback logger,
                                     void *logger_context,
                                     MHD_AccessHandlerCallback handler,
                                     void *handler_context,
                                     MHD_RequestCompletedCallback completed,
                                     void *completed_context,
                                     const struct MHD_OptionItem *options) {
    return MHD_start_daemon(flags, port, NULL, NULL, handler, handler_context,
                            MHD_OPTION_EXTERNAL_LOGGER, logger, logger_context,
                            MHD_OPTION_NOTIFY_COMPLETED, completed, completed_context,
                            MHD_OPTION_ARRAY, options,
                            MHD_OPTION_END);
}

const union MHD_DaemonInfo *cmhd_get_daemon_info(struct MHD_Daemon *daemon,
                                                 enum MHD_DaemonInfoType info_type) {
    return MHD_get_daemon_info(daemon, info_type);
}
