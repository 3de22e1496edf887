// hiredis (libhiredis-dev): the synchronous Redis client and its reply reader.
#include <hiredis/hiredis.h>
