// Lua 5.4 (Debian's liblua5.4-dev) as seen from Swift: the library's own headers, wrappers for
// the C API macros Swift cannot import, and the host's allocator and instruction budget.
#ifndef CLUA_H
#define CLUA_H

#include <stddef.h>
#include <stdint.h>
#include <lua5.4/lua.h>
#include <lua5.4/lauxlib.h>
#include <lua5.4/lualib.h>

// Per-state limits, stored in the state's extra space so the allocator and the hook find them.
// The Swift owner of the lua_State owns this struct and frees it after lua_close.
typedef struct clua_limits {
    size_t memory_used;       // bytes currently allocated by the state
    size_t memory_limit;      // 0 means unlimited
    size_t memory_peak;       // highest memory_used seen
    int64_t budget_remaining; // instructions left for the current call
    int64_t budget_per_call;  // what clua_arm_budget restores; 0 means unlimited
    int budget_exhausted;     // set once the hook has raised for the current call
    int memory_exceeded;      // set when an allocation was refused by the cap
    // The cap is enforced only while this is non-zero, that is while the host runs Lua code or
    // the decoder under a protected call. The host's own small pushes between calls must not
    // fail, because a memory error outside a protected call would abort the process.
    int enforce_memory_limit;
} clua_limits;

// Creates a state whose allocator counts into `limits` and refuses to pass memory_limit.
lua_State *clua_newstate(clua_limits *limits);
clua_limits *clua_getlimits(lua_State *L);

// Restores the instruction budget before a call from the host and installs the count hook.
// When the budget runs out the hook raises "instruction budget exceeded", then re-arms itself
// with a count of 1 so a pcall inside the script cannot swallow the stop.
void clua_arm_budget(lua_State *L);

// Wrappers for C API macros (lua.h and lauxlib.h define these as macros).
void clua_pop(lua_State *L, int n);
void clua_newtable(lua_State *L);
int clua_pcall(lua_State *L, int nargs, int nresults, int msgh);
const char *clua_tostring(lua_State *L, int idx);
int clua_isnil(lua_State *L, int idx);
int clua_isnoneornil(lua_State *L, int idx);
int clua_istable(lua_State *L, int idx);
int clua_isfunction(lua_State *L, int idx);
void clua_pushcfunction(lua_State *L, lua_CFunction f);
int clua_upvalueindex(int i);
int clua_registryindex(void);
void clua_insert(lua_State *L, int idx);
void clua_remove(lua_State *L, int idx);
void clua_replace(lua_State *L, int idx);
int clua_getglobal_registry(lua_State *L, int ref);
lua_Integer clua_tointegerx(lua_State *L, int idx, int *isnum);
lua_Number clua_tonumberx(lua_State *L, int idx, int *isnum);
void *clua_newuserdata(lua_State *L, size_t size);
int clua_loadbuffer_text(lua_State *L, const char *buffer, size_t size, const char *chunkname);
int clua_error_string(lua_State *L, const char *message);

// What a host function hands back to its trampoline. Swift host functions use only C API calls
// that cannot raise (type checks, reading strings, pushing numbers); anything that allocates in
// Lua or raises an error is done by the C trampoline, so no longjmp ever crosses a Swift frame.
enum {
    CLUA_RESULT_PUSHED = 0, // the host function pushed `count` values itself
    CLUA_RESULT_ERROR,      // raise `data` (length bytes) as an error, with the caller's position
    CLUA_RESULT_STRING,     // push `data` as one Lua string
    CLUA_RESULT_JSON,       // decode `data` as JSON and push it; an empty `data` pushes nil
    CLUA_RESULT_REPLY,      // push a serialized reply tree (see clua_push_reply)
};

typedef struct clua_result {
    int kind;
    int count;
    const char *data;
    size_t length;
} clua_result;

typedef void (*clua_host_function)(lua_State *L, void *context, clua_result *result);

// Pushes a Lua closure that calls `function(L, context, &result)` and acts on the result.
// The caller keeps `context` alive for as long as the closure can be called.
void clua_push_host_function(lua_State *L, clua_host_function function, void *context);

// Decodes a reply tree serialized as: 'n' (nil) | 'i' int64 (8 bytes, little endian) |
// 'd' double (8 bytes) | 's' uint32 length + bytes | 't' / 'f' (booleans) |
// 'a' uint32 count + items | 'j' uint32 length + JSON (decoded) |
// 'e' uint32 length + message (raised as an error).
// Pushes one value; used for query replies from Redis and ClickHouse.
// Implemented next to the trampoline; exposed for tests.
int clua_push_reply(lua_State *L, const char *data, size_t length);

// Pushes the JSON value decoded from `data`, or raises a Lua error; installed by CLuaJSON's
// user at start so this module need not depend on the codec.
typedef int (*clua_json_decoder)(lua_State *L, const char *data, size_t length);
void clua_set_json_decoder(clua_json_decoder decoder);

// A message handler for lua_pcall that appends a traceback to the error (luaL_traceback).
int clua_traceback_handler(lua_State *L);

#endif
