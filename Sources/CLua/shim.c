#include "CLua.h"

#include <stdlib.h>
#include <string.h>

// Counts every allocation against the cap; returning NULL makes Lua raise "not enough memory".
static void *clua_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    clua_limits *limits = (clua_limits *)ud;
    size_t old = ptr ? osize : 0;

    if (nsize == 0) {
        free(ptr);
        limits->memory_used -= old;
        return NULL;
    }
    if (limits->enforce_memory_limit && limits->memory_limit != 0 && nsize > old &&
        limits->memory_used + (nsize - old) > limits->memory_limit) {
        limits->memory_exceeded = 1;
        return NULL;
    }
    void *block = realloc(ptr, nsize);
    if (block == NULL) {
        return NULL;
    }
    limits->memory_used = limits->memory_used - old + nsize;
    if (limits->memory_used > limits->memory_peak) {
        limits->memory_peak = limits->memory_used;
    }
    return block;
}

lua_State *clua_newstate(clua_limits *limits) {
    lua_State *L = lua_newstate(clua_alloc, limits);
    if (L != NULL) {
        *(clua_limits **)lua_getextraspace(L) = limits;
    }
    return L;
}

clua_limits *clua_getlimits(lua_State *L) {
    return *(clua_limits **)lua_getextraspace(L);
}

// The hook granularity: the budget is checked every this many VM instructions.
#define CLUA_HOOK_STEP 1000

static void clua_budget_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    clua_limits *limits = clua_getlimits(L);
    if (limits->budget_exhausted) {
        luaL_error(L, "instruction budget exceeded");
        return;
    }
    limits->budget_remaining -= CLUA_HOOK_STEP;
    if (limits->budget_remaining <= 0) {
        limits->budget_exhausted = 1;
        // Fire on every instruction from now on, so that an error caught by pcall in the
        // script is raised again at once.
        lua_sethook(L, clua_budget_hook, LUA_MASKCOUNT, 1);
        luaL_error(L, "instruction budget exceeded (%I instructions per call)",
                   (lua_Integer)limits->budget_per_call);
    }
}

void clua_arm_budget(lua_State *L) {
    clua_limits *limits = clua_getlimits(L);
    limits->budget_exhausted = 0;
    limits->budget_remaining = limits->budget_per_call;
    if (limits->budget_per_call > 0) {
        lua_sethook(L, clua_budget_hook, LUA_MASKCOUNT, CLUA_HOOK_STEP);
    } else {
        lua_sethook(L, NULL, 0, 0);
    }
}

void clua_pop(lua_State *L, int n) { lua_pop(L, n); }
void clua_newtable(lua_State *L) { lua_newtable(L); }
int clua_pcall(lua_State *L, int nargs, int nresults, int msgh) {
    return lua_pcall(L, nargs, nresults, msgh);
}
const char *clua_tostring(lua_State *L, int idx) { return lua_tostring(L, idx); }
int clua_isnil(lua_State *L, int idx) { return lua_isnil(L, idx); }
int clua_isnoneornil(lua_State *L, int idx) { return lua_isnoneornil(L, idx); }
int clua_istable(lua_State *L, int idx) { return lua_istable(L, idx); }
int clua_isfunction(lua_State *L, int idx) { return lua_isfunction(L, idx); }
void clua_pushcfunction(lua_State *L, lua_CFunction f) { lua_pushcfunction(L, f); }
int clua_upvalueindex(int i) { return lua_upvalueindex(i); }
int clua_registryindex(void) { return LUA_REGISTRYINDEX; }
void clua_insert(lua_State *L, int idx) { lua_insert(L, idx); }
void clua_remove(lua_State *L, int idx) { lua_remove(L, idx); }
void clua_replace(lua_State *L, int idx) { lua_replace(L, idx); }
int clua_getglobal_registry(lua_State *L, int ref) {
    return lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
}
lua_Integer clua_tointegerx(lua_State *L, int idx, int *isnum) {
    return lua_tointegerx(L, idx, isnum);
}
lua_Number clua_tonumberx(lua_State *L, int idx, int *isnum) {
    return lua_tonumberx(L, idx, isnum);
}
void *clua_newuserdata(lua_State *L, size_t size) { return lua_newuserdatauv(L, size, 1); }

// Loads text only: binary chunks could break the VM's memory safety.
int clua_loadbuffer_text(lua_State *L, const char *buffer, size_t size, const char *chunkname) {
    return luaL_loadbufferx(L, buffer, size, chunkname, "t");
}

int clua_error_string(lua_State *L, const char *message) {
    lua_pushstring(L, message);
    return lua_error(L);
}

int clua_traceback_handler(lua_State *L) {
    const char *message = lua_tostring(L, 1);
    if (message == NULL && luaL_getmetafield(L, 1, "__tostring") != LUA_TNIL) {
        lua_pop(L, 1);
        message = luaL_tolstring(L, 1, NULL);
    } else if (message == NULL) {
        // "table: 0x..." would differ between runs; name the type instead.
        message = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    luaL_traceback(L, L, message, 1);
    return 1;
}

// The JSON decoder lives in CLuaJSON, which depends on this module, so the trampoline reaches
// it through a pointer that CLuaJSON installs (cljson_install_host_decoder).
static clua_json_decoder clua_decoder = NULL;

void clua_set_json_decoder(clua_json_decoder decoder) { clua_decoder = decoder; }

// Reads one reply value at *cursor; returns 0 when the serialized data is malformed.
static int clua_read_reply(lua_State *L, const char *data, size_t length, size_t *cursor,
                           int depth) {
    if (*cursor >= length || depth > 32) {
        return 0;
    }
    char tag = data[(*cursor)++];
    uint32_t count = 0;
    switch (tag) {
    case 'n':
        lua_pushnil(L);
        return 1;
    case 't':
    case 'f':
        lua_pushboolean(L, tag == 't');
        return 1;
    case 'i':
    case 'd': {
        if (length - *cursor < 8) {
            return 0;
        }
        if (tag == 'i') {
            int64_t value;
            memcpy(&value, data + *cursor, 8);
            lua_pushinteger(L, (lua_Integer)value);
        } else {
            double value;
            memcpy(&value, data + *cursor, 8);
            lua_pushnumber(L, value);
        }
        *cursor += 8;
        return 1;
    }
    case 's':
    case 'j':
    case 'e':
    case 'a':
        if (length - *cursor < 4) {
            return 0;
        }
        memcpy(&count, data + *cursor, 4);
        *cursor += 4;
        break;
    default:
        return 0;
    }
    if (tag == 'a') {
        luaL_checkstack(L, 3, "reply nesting");
        lua_createtable(L, (int)count, 0);
        for (uint32_t i = 0; i < count; i++) {
            if (!clua_read_reply(L, data, length, cursor, depth + 1)) {
                return 0;
            }
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        return 1;
    }
    if (length - *cursor < count) {
        return 0;
    }
    if (tag == 'j') {
        if (clua_decoder == NULL) {
            return luaL_error(L, "no JSON decoder installed");
        }
        clua_decoder(L, data + *cursor, count);
        *cursor += count;
        return 1;
    }
    lua_pushlstring(L, data + *cursor, count);
    *cursor += count;
    if (tag == 'e') {
        lua_error(L);
    }
    return 1;
}

int clua_push_reply(lua_State *L, const char *data, size_t length) {
    size_t cursor = 0;
    int top = lua_gettop(L);
    if (!clua_read_reply(L, data, length, &cursor, 0)) {
        lua_settop(L, top);
        return luaL_error(L, "malformed reply from the host (%d bytes)", (int)length);
    }
    return 1;
}


static int clua_host_trampoline(lua_State *L) {
    clua_host_function function =
        (clua_host_function)lua_touserdata(L, lua_upvalueindex(1));
    void *context = lua_touserdata(L, lua_upvalueindex(2));
    clua_result result = {CLUA_RESULT_PUSHED, 0, NULL, 0};

    function(L, context, &result);

    switch (result.kind) {
    case CLUA_RESULT_ERROR:
        luaL_where(L, 1);
        lua_pushlstring(L, result.data, result.length);
        lua_concat(L, 2);
        return lua_error(L);
    case CLUA_RESULT_STRING:
        lua_pushlstring(L, result.data, result.length);
        return 1;
    case CLUA_RESULT_JSON:
        if (result.length == 0) {
            lua_pushnil(L);
            return 1;
        }
        if (clua_decoder == NULL) {
            return luaL_error(L, "no JSON decoder installed");
        }
        return clua_decoder(L, result.data, result.length);
    case CLUA_RESULT_REPLY:
        return clua_push_reply(L, result.data, result.length);
    default:
        return result.count;
    }
}

void clua_push_host_function(lua_State *L, clua_host_function function, void *context) {
    lua_pushlightuserdata(L, (void *)function);
    lua_pushlightuserdata(L, context);
    lua_pushcclosure(L, clua_host_trampoline, 2);
}
