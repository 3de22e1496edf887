// The `json` Lua library, the null sentinel, the array metatable and the helpers that the
// decoder (decode.c) and the encoder (encode.c) share.
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// Output buffers of json.encode larger than this are freed after each call instead of being
// kept for the next one.
#define RETAINED_ENCODE_BUFFER_MAX ((size_t)1 << 20)

const unsigned char cljson_byte_class[256] = {
    [0x00 ... 0x1F] = CLJSON_BYTE_SPECIAL,
    ['"'] = CLJSON_BYTE_SPECIAL,
    ['\\'] = CLJSON_BYTE_SPECIAL,
    [0x80 ... 0xFF] = CLJSON_BYTE_LEAD,
};

// Only the addresses matter: one identifies json.null, the other keys the array metatable in
// the registry.
static const char null_marker;
static const char array_metatable_key;

const void *cljson_null_marker(void) {
    return &null_marker;
}

void cljson_push_null(lua_State *L) {
    lua_pushlightuserdata(L, (void *)&null_marker);
}

void cljson_push_array_metatable(lua_State *L) {
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &array_metatable_key) == LUA_TTABLE) {
        return;
    }
    lua_pop(L, 1);
    lua_createtable(L, 0, 2);
    lua_pushliteral(L, "json.array");
    lua_setfield(L, -2, "__name");
    // Scripts see the string instead of the table, and cannot change or replace the metatable
    // that all decoded arrays share. json.object removes the tag from C.
    lua_pushliteral(L, "json.array");
    lua_setfield(L, -2, "__metatable");
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &array_metatable_key);
}

void cljson_push_array_metatable_if_present(lua_State *L) {
    lua_rawgetp(L, LUA_REGISTRYINDEX, &array_metatable_key);
}

void cljson_write_error(char *error, size_t capacity, const char *format, ...) {
    va_list arguments;

    if (error == NULL || capacity == 0) {
        return;
    }
    va_start(arguments, format);
    vsnprintf(error, capacity, format, arguments);
    va_end(arguments);
}

void cljson_buffer_free(cljson_buffer *buffer) {
    if (buffer == NULL) {
        return;
    }
    free(buffer->data);
    buffer->data = NULL;
    buffer->length = 0;
    buffer->capacity = 0;
}

static int is_tagged_array(lua_State *L, int index) {
    if (!lua_getmetatable(L, index)) {
        return 0;
    }
    cljson_push_array_metatable_if_present(L);
    int tagged = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    return tagged;
}

// json.decode(text): the decoded value, or raises an error with the message.
static int json_decode(lua_State *L) {
    cljson_limits limits = {CLJSON_DEFAULT_MAX_DEPTH, 0};
    char error[256];
    size_t length;

    luaL_checktype(L, 1, LUA_TSTRING);
    const char *text = lua_tolstring(L, 1, &length);
    if (!cljson_decode(L, text, length, &limits, error, sizeof error)) {
        lua_pushstring(L, error);
        return lua_error(L);
    }
    return 1;
}

static void release_large_buffer(cljson_buffer *buffer) {
    if (buffer->capacity > RETAINED_ENCODE_BUFFER_MAX) {
        cljson_buffer_free(buffer);
    }
}

// json.encode(value [, {sort_keys = true}]): the JSON text, or raises an error with the message.
// The output buffer is upvalue 1, a userdata that frees it when collected, so an error raised
// by lua_pushlstring cannot leak it.
// NOTE: the buffer comes from malloc, so the state's memory cap does not count it. The string
// made from it does count.
static int json_encode(lua_State *L) {
    cljson_buffer *buffer = lua_touserdata(L, lua_upvalueindex(1));
    int flags = 0;
    char error[512];

    luaL_checkany(L, 1);
    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        lua_getfield(L, 2, "sort_keys");
        if (lua_toboolean(L, -1)) {
            flags |= CLJSON_SORT_KEYS;
        }
        lua_pop(L, 1);
    }

    buffer->length = 0;
    if (!cljson_encode(L, 1, buffer, flags, CLJSON_DEFAULT_MAX_DEPTH, error, sizeof error)) {
        release_large_buffer(buffer);
        lua_pushstring(L, error);
        return lua_error(L);
    }
    lua_pushlstring(L, buffer->data, buffer->length);
    release_large_buffer(buffer);
    return 1;
}

static int free_encode_buffer(lua_State *L) {
    cljson_buffer_free(lua_touserdata(L, 1));
    return 0;
}

// json.array([t]): tags t, or a new table, as an array and returns it. Replaces any other
// metatable of t.
static int json_array(lua_State *L) {
    if (lua_isnoneornil(L, 1)) {
        lua_settop(L, 0);
        lua_newtable(L);
    } else {
        luaL_checktype(L, 1, LUA_TTABLE);
        lua_settop(L, 1);
    }
    cljson_push_array_metatable(L);
    lua_setmetatable(L, 1);
    return 1;
}

// json.object([t]): removes the array tag from t, or returns a new table. Other metatables
// stay.
static int json_object(lua_State *L) {
    if (lua_isnoneornil(L, 1)) {
        lua_newtable(L);
        return 1;
    }
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    if (is_tagged_array(L, 1)) {
        lua_pushnil(L);
        lua_setmetatable(L, 1);
    }
    return 1;
}

// json.is_array(v): whether v is a table tagged as an array (decoded or from json.array).
static int json_is_array(lua_State *L) {
    lua_pushboolean(L, lua_type(L, 1) == LUA_TTABLE && is_tagged_array(L, 1));
    return 1;
}

int cljson_open(lua_State *L) {
    static const luaL_Reg functions[] = {
        {"decode", json_decode},
        {"array", json_array},
        {"object", json_object},
        {"is_array", json_is_array},
        {NULL, NULL},
    };

    cljson_push_array_metatable(L);
    lua_pop(L, 1);
    luaL_newlib(L, functions);

    cljson_buffer *buffer = lua_newuserdatauv(L, sizeof *buffer, 0);
    memset(buffer, 0, sizeof *buffer);
    if (luaL_newmetatable(L, "json.encode_buffer")) {
        lua_pushcfunction(L, free_encode_buffer);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    lua_pushcclosure(L, json_encode, 1);
    lua_setfield(L, -2, "encode");

    cljson_push_null(L);
    lua_setfield(L, -2, "null");
    return 1;
}
