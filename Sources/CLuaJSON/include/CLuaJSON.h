// The JSON codec shared by events, ClickHouse rows, query results, state values and dead
// letters. It decodes straight into Lua values and encodes Lua values, with no intermediate tree.
#ifndef CLUAJSON_H
#define CLUAJSON_H

#include <stddef.h>
#include <stdint.h>
#include "../../CLua/include/CLua.h"

typedef struct cljson_limits {
    size_t max_depth;   // nesting of arrays and objects; 0 means the default (64)
    size_t max_bytes;   // input size for decode; 0 means unlimited
} cljson_limits;

// A growable output buffer. The caller owns it and releases it with cljson_buffer_free.
typedef struct cljson_buffer {
    char *data;
    size_t length;
    size_t capacity;
} cljson_buffer;

enum {
    CLJSON_SORT_KEYS = 1,   // object keys in byte order, for deterministic output
};

// Decodes `length` bytes and pushes one Lua value. Runs in protected mode, so a Lua memory
// error is reported instead of unwinding. Returns 1 on success; on failure pushes nothing,
// returns 0 and writes a message with the byte offset into `error` (NUL-terminated).
// Offsets count from 0. Rules and messages: docs/json.md.
int cljson_decode(lua_State *L, const char *bytes, size_t length, const cljson_limits *limits,
                  char *error, size_t error_capacity);

// Encodes the value at stack index `index` and appends it to `out`. Returns 1 on success. On
// failure returns 0, leaves `out->length` as it was and writes a message naming the path of the
// bad value, for example `$.rows[3].px` (array indexes are Lua's, from 1). Never raises a Lua
// error and leaves the stack as it was. A max_depth of 0 means 64.
int cljson_encode(lua_State *L, int index, cljson_buffer *out, int flags, size_t max_depth,
                  char *error, size_t error_capacity);

void cljson_buffer_free(cljson_buffer *buffer);

// Pushes the `json` library table: decode, encode, null, array, object, is_array. It may raise a
// Lua memory error, so call it through luaL_requiref or lua_pcall, or before a memory cap applies.
int cljson_open(lua_State *L);

// Pushes the null sentinel (the value that `json.null` holds).
void cljson_push_null(lua_State *L);

// Makes CLua's host-function trampoline decode CLUA_RESULT_JSON results with this codec.
void cljson_install_host_decoder(void);

#endif
