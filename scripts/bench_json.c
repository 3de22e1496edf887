// Measures JSON decoding into Lua values, and encoding back, for the choice recorded in
// docs/json.md. Build and run it with scripts/bench-json.sh.
//
// The decoders run on the same two payloads, a bar event and a ~4 KB nested document:
// - cljson_decode: this codec through its C API (single pass, values built directly).
// - json.decode: this codec called as a Lua function, the way projections call it.
// - jansson+walk: jansson's json_loadb, then a walk of the tree that builds Lua values inside
//   lua_pcall, as a shim around a Debian C library would have to.
// - lua-cjson: Debian's lua-cjson 2.1.0, for reference. It decodes every number as a float.
// The encoders are this codec (cljson_encode and json.encode) and lua-cjson's encode.
//
// Usage: bench_json [seconds per case]   (default 0.25)
#include "CLuaJSON.h"

#include <dlfcn.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CJSON_MODULE_PATH "/usr/lib/x86_64-linux-gnu/lua/5.4/cjson.so"

static const char bar_event[] =
    "{\"tenant_id\":\"t1\",\"instrument_id\":\"AAPL\",\"timeframe\":\"1m\","
    "\"start_ms\":1764800000000,\"end_ms\":1764800060000,\"open\":101.25,\"high\":101.9,"
    "\"low\":100.8,\"close\":101.5,\"volume\":12345.5,\"trade_count\":321,\"vwap\":101.41,"
    "\"revision\":0}";

static double seconds_per_case = 0.25;

static double now_seconds(void) {
    struct timespec time;
    clock_gettime(CLOCK_MONOTONIC, &time);
    return (double)time.tv_sec + (double)time.tv_nsec / 1e9;
}

// Builds a query-result style document of about 4 KB: a header object, then rows that mix
// strings (one with escapes and non-ASCII text), integers, floats, booleans, null and nested
// arrays and objects.
static char *build_nested_payload(size_t *length) {
    static const char *instruments[] = {"AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META",
                                        "TSLA", "ASML", "SAP", "TSM", "NFLX", "ORCL"};
    size_t capacity = 8192;
    char *text = malloc(capacity);
    size_t used = 0;

    used += (size_t)snprintf(text + used, capacity - used,
                             "{\"query_id\":\"q-7f3a\",\"tenant_id\":\"t1\","
                             "\"generated_at_ms\":1764800060000,\"partial\":false,"
                             "\"columns\":[\"instrument_id\",\"start_ms\",\"open\",\"high\","
                             "\"low\",\"close\",\"volume\"],\"rows\":[");
    for (int i = 0; i < 12; i++) {
        used += (size_t)snprintf(
            text + used, capacity - used,
            "%s{\"instrument_id\":\"%s\",\"start_ms\":%lld,\"open\":%.2f,\"high\":%.2f,"
            "\"low\":%.2f,\"close\":%.2f,\"volume\":%.1f,\"trade_count\":%d,"
            "\"halted\":%s,\"venue\":null,\"tags\":[\"equity\",\"us\",\"tier-%d\"],"
            "\"meta\":{\"exchange\":\"XNAS\",\"note\":\"caf\\u00e9 \\\"late\\\" print\\n\","
            "\"label\":\"Z\xc3\xbcrich \xe2\x86\x92 NYC\",\"revisions\":[0,1,%d]}}",
            i == 0 ? "" : ",", instruments[i], 1764800000000LL + i * 60000LL, 100.25 + i,
            101.9 + i, 99.8 + i, 101.5 + i, 12345.5 * (i + 1), 300 + i, i % 3 == 0 ? "true" : "false",
            i % 4, i);
    }
    used += (size_t)snprintf(text + used, capacity - used,
                             "],\"summary\":{\"row_count\":12,\"vwap\":101.41,"
                             "\"bounds\":{\"min_ms\":1764800000000,\"max_ms\":1764800540000}}}");
    *length = used;
    return text;
}

typedef struct result {
    double nanoseconds_per_call;
    double megabytes_per_second;
} result;

typedef void (*bench_body)(lua_State *L, void *context);

// Runs `body` in batches until `seconds_per_case` has passed, after a short warm-up.
static result run_case(lua_State *L, bench_body body, void *context, size_t bytes_per_call) {
    const int batch = 256;
    double warm_up_end = now_seconds() + seconds_per_case / 5;
    while (now_seconds() < warm_up_end) {
        for (int i = 0; i < batch; i++) {
            body(L, context);
        }
    }
    long long calls = 0;
    double start = now_seconds();
    double elapsed = 0;
    do {
        for (int i = 0; i < batch; i++) {
            body(L, context);
        }
        calls += batch;
        elapsed = now_seconds() - start;
    } while (elapsed < seconds_per_case);

    result measured = {
        .nanoseconds_per_call = elapsed * 1e9 / (double)calls,
        .megabytes_per_second = (double)bytes_per_call * (double)calls / elapsed / 1e6,
    };
    return measured;
}

typedef struct payload {
    const char *name;
    const char *bytes;
    size_t length;
    int lua_string_slot;    // the payload as a Lua string, for the Lua-level decoders
    int codec_value_slot;   // the payload decoded by this codec, for encoding
    int cjson_value_slot;   // the payload decoded by lua-cjson, for its encoder
} payload;

// Slots of the Lua functions under test.
static int json_decode_slot, json_encode_slot, cjson_decode_slot, cjson_encode_slot;

static void fail(const char *message) {
    fprintf(stderr, "bench_json: %s\n", message);
    exit(1);
}

static void bench_cljson_decode(lua_State *L, void *context) {
    payload *input = context;
    char error[256];
    if (!cljson_decode(L, input->bytes, input->length, NULL, error, sizeof error)) {
        fail(error);
    }
    lua_pop(L, 1);
}

static void call_lua_function(lua_State *L, int function_slot, int argument_slot) {
    lua_pushvalue(L, function_slot);
    lua_pushvalue(L, argument_slot);
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
        fail(lua_tostring(L, -1));
    }
    lua_pop(L, 1);
}

static void bench_json_decode(lua_State *L, void *context) {
    call_lua_function(L, json_decode_slot, ((payload *)context)->lua_string_slot);
}

static void bench_cjson_decode(lua_State *L, void *context) {
    call_lua_function(L, cjson_decode_slot, ((payload *)context)->lua_string_slot);
}

static void bench_json_encode(lua_State *L, void *context) {
    call_lua_function(L, json_encode_slot, ((payload *)context)->codec_value_slot);
}

static void bench_cjson_encode(lua_State *L, void *context) {
    call_lua_function(L, cjson_encode_slot, ((payload *)context)->cjson_value_slot);
}

static cljson_buffer encode_buffer;

static void bench_cljson_encode(lua_State *L, void *context) {
    char error[256];
    encode_buffer.length = 0;
    if (!cljson_encode(L, ((payload *)context)->codec_value_slot, &encode_buffer, 0, 0, error,
                       sizeof error)) {
        fail(error);
    }
}

// Pushes the Lua value for a jansson tree, with the same mapping as this codec: tagged arrays,
// json.null, integers as Lua integers.
static void push_jansson_value(lua_State *L, json_t *value) {
    luaL_checkstack(L, 3, "jansson tree too deep");
    switch (json_typeof(value)) {
    case JSON_OBJECT: {
        lua_createtable(L, 0, (int)json_object_size(value));
        for (void *member = json_object_iter(value); member != NULL;
             member = json_object_iter_next(value, member)) {
            lua_pushlstring(L, json_object_iter_key(member), json_object_iter_key_len(member));
            push_jansson_value(L, json_object_iter_value(member));
            lua_rawset(L, -3);
        }
        break;
    }
    case JSON_ARRAY: {
        size_t count = json_array_size(value);
        lua_createtable(L, (int)count, 0);
        lua_getfield(L, LUA_REGISTRYINDEX, "bench.array_metatable");
        lua_setmetatable(L, -2);
        for (size_t i = 0; i < count; i++) {
            push_jansson_value(L, json_array_get(value, i));
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        break;
    }
    case JSON_STRING:
        lua_pushlstring(L, json_string_value(value), json_string_length(value));
        break;
    case JSON_INTEGER:
        lua_pushinteger(L, (lua_Integer)json_integer_value(value));
        break;
    case JSON_REAL:
        lua_pushnumber(L, json_real_value(value));
        break;
    case JSON_TRUE:
        lua_pushboolean(L, 1);
        break;
    case JSON_FALSE:
        lua_pushboolean(L, 0);
        break;
    case JSON_NULL:
        cljson_push_null(L);
        break;
    }
}

static int push_jansson_protected(lua_State *L) {
    push_jansson_value(L, lua_touserdata(L, 1));
    return 1;
}

// Decodes with jansson and converts the tree inside lua_pcall. Leaves the value on the stack.
static void decode_with_jansson(lua_State *L, const payload *input) {
    json_error_t error;
    json_t *tree = json_loadb(input->bytes, input->length, 0, &error);
    if (tree == NULL) {
        fail(error.text);
    }
    lua_pushcfunction(L, push_jansson_protected);
    lua_pushlightuserdata(L, tree);
    int status = lua_pcall(L, 1, 1, 0);
    json_decref(tree);
    if (status != LUA_OK) {
        fail(lua_tostring(L, -1));
    }
}

static void bench_jansson_decode(lua_State *L, void *context) {
    decode_with_jansson(L, context);
    lua_pop(L, 1);
}

// Encodes the value at the top of the stack with sorted keys, for comparing decoders.
static char *encode_sorted(lua_State *L) {
    cljson_buffer buffer = {0};
    char error[256];
    if (!cljson_encode(L, -1, &buffer, CLJSON_SORT_KEYS, 0, error, sizeof error)) {
        fail(error);
    }
    char *text = strndup(buffer.data, buffer.length);
    cljson_buffer_free(&buffer);
    return text;
}

// Checks that jansson+walk and this codec build the same Lua value, so that both do the same
// work.
static void check_same_values(lua_State *L, const payload *input) {
    char error[256];
    if (!cljson_decode(L, input->bytes, input->length, NULL, error, sizeof error)) {
        fail(error);
    }
    char *from_codec = encode_sorted(L);
    lua_pop(L, 1);
    decode_with_jansson(L, input);
    char *from_jansson = encode_sorted(L);
    lua_pop(L, 1);
    if (strcmp(from_codec, from_jansson) != 0) {
        fprintf(stderr, "codec:   %s\njansson: %s\n", from_codec, from_jansson);
        fail("jansson+walk and this codec decoded the payload differently");
    }
    free(from_codec);
    free(from_jansson);
}

static void load_cjson(lua_State *L) {
    void *module = dlopen(CJSON_MODULE_PATH, RTLD_NOW);
    if (module == NULL) {
        fail(dlerror());
    }
    lua_CFunction open_cjson = (lua_CFunction)dlsym(module, "luaopen_cjson");
    if (open_cjson == NULL) {
        fail(dlerror());
    }
    luaL_requiref(L, "cjson", open_cjson, 0);
    lua_getfield(L, -1, "decode");
    cjson_decode_slot = lua_gettop(L);
    lua_getfield(L, -2, "encode");
    cjson_encode_slot = lua_gettop(L);
}

static void print_row(const char *operation, const char *implementation, const payload *input,
                      result measured) {
    printf("| %-6s | %-14s | %-7s | %7zu | %10.0f | %8.1f |\n", operation, implementation,
           input->name, input->length, measured.nanoseconds_per_call,
           measured.megabytes_per_second);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc > 1) {
        seconds_per_case = atof(argv[1]);
        if (seconds_per_case <= 0) {
            fail("the argument must be a positive number of seconds per case");
        }
    }

    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    luaL_requiref(L, "json", cljson_open, 1);
    lua_getfield(L, -1, "decode");
    json_decode_slot = lua_gettop(L);
    lua_getfield(L, -2, "encode");
    json_encode_slot = lua_gettop(L);
    load_cjson(L);

    // jansson+walk tags arrays with this codec's metatable, taken from a decoded array.
    char error[256];
    if (!cljson_decode(L, "[]", 2, NULL, error, sizeof error)) {
        fail(error);
    }
    lua_getmetatable(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, "bench.array_metatable");
    lua_pop(L, 1);

    size_t nested_length;
    char *nested = build_nested_payload(&nested_length);
    payload payloads[] = {
        {.name = "bar", .bytes = bar_event, .length = sizeof bar_event - 1},
        {.name = "nested", .bytes = nested, .length = nested_length},
    };
    for (size_t i = 0; i < 2; i++) {
        payload *input = &payloads[i];
        lua_pushlstring(L, input->bytes, input->length);
        input->lua_string_slot = lua_gettop(L);
        if (!cljson_decode(L, input->bytes, input->length, NULL, error, sizeof error)) {
            fail(error);
        }
        input->codec_value_slot = lua_gettop(L);
        lua_pushvalue(L, cjson_decode_slot);
        lua_pushvalue(L, input->lua_string_slot);
        lua_call(L, 1, 1);
        input->cjson_value_slot = lua_gettop(L);
        check_same_values(L, input);
    }

    printf("| op     | implementation | payload | bytes   | ns/call    | MB/s     |\n");
    printf("|--------|----------------|---------|---------|------------|----------|\n");
    for (size_t i = 0; i < 2; i++) {
        payload *input = &payloads[i];
        print_row("decode", "cljson_decode", input,
                  run_case(L, bench_cljson_decode, input, input->length));
        print_row("decode", "json.decode", input,
                  run_case(L, bench_json_decode, input, input->length));
        print_row("decode", "jansson+walk", input,
                  run_case(L, bench_jansson_decode, input, input->length));
        print_row("decode", "lua-cjson", input,
                  run_case(L, bench_cjson_decode, input, input->length));
    }
    for (size_t i = 0; i < 2; i++) {
        payload *input = &payloads[i];
        // Throughput counts the JSON text length, so encode and decode figures compare.
        print_row("encode", "cljson_encode", input,
                  run_case(L, bench_cljson_encode, input, input->length));
        print_row("encode", "json.encode", input,
                  run_case(L, bench_json_encode, input, input->length));
        print_row("encode", "lua-cjson", input,
                  run_case(L, bench_cjson_encode, input, input->length));
    }

    cljson_buffer_free(&encode_buffer);
    free(nested);
    lua_close(L);
    return 0;
}
