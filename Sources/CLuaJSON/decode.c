// JSON text to Lua values in one pass, with no intermediate tree.
//
// The parser is iterative, so deep nesting costs Lua stack slots and small records but no C
// stack. The members of an open array or object wait on the Lua stack until it closes, and
// then go into a table created at its final size, which saves the rehashing of a growing
// table. A container that reaches PENDING_MEMBERS_MAX members gets its table at that point
// and takes further members directly, which bounds the stack that one level uses.
#include "internal.h"

#include <locale.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// Members (objects) or elements (arrays) that wait on the Lua stack before a container gets
// its table.
#define PENDING_MEMBERS_MAX 32

// Lua stack slots that one open container may use at once: its pending keys and values, the
// table being filled with two pushed copies, and a string buffer or temporary number text.
#define SLOTS_PER_LEVEL (2 * PENDING_MEMBERS_MAX + 6)

// Open containers whose records fit in the C stack frame. Deeper ones move to a userdata.
#define INLINE_CONTAINERS 64

// Stack slots of the protected call.
#define DECODER_SLOT 1          // light userdata: the decoder
#define ARRAY_METATABLE_SLOT 2  // the shared array metatable
#define CONTAINERS_SLOT 3       // nil, or the userdata that contains the open container records

// An open array or object. Until it has its table, its members are the stack slots above
// `base` (key and value pairs for an object). Once `is_direct` is set, the table is at
// base + 1 and each member is stored into it as soon as it is complete.
typedef struct open_container {
    int is_object;
    int is_direct;
    int base;             // the stack top when the container opened
    lua_Integer count;    // members or elements so far
} open_container;

typedef struct decoder {
    const unsigned char *start;
    const unsigned char *end;
    size_t max_depth;
    char *error;
    size_t error_capacity;
    int failed;
    open_container *containers;   // the open containers, outermost first
    size_t depth;                 // how many are open
    size_t capacity;
} decoder;

// A number whose digits, read as one integer, are at most FAST_MANTISSA_MAX and whose decimal
// exponent is within +-FAST_POW10_MAX converts with one multiplication or division. Both
// operands are exact doubles, so the single rounding gives the correctly rounded result
// (Clinger's fast path).
#define FAST_MANTISSA_MAX (UINT64_C(1) << 53)
#define FAST_POW10_MAX 22
static const double exact_powers_of_ten[FAST_POW10_MAX + 1] = {
    1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
    1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
};

// Number tokens shorter than this are copied to the C stack for strtod. Longer ones go to a
// temporary userdata block.
#define NUMBER_COPY_MAX 64

// Records "invalid JSON at byte N: ..." for the byte at `at` and returns 0.
__attribute__((format(printf, 3, 4)))
static int decode_fail(decoder *d, const unsigned char *at, const char *format, ...) {
    char detail[200];
    va_list arguments;

    va_start(arguments, format);
    vsnprintf(detail, sizeof detail, format, arguments);
    va_end(arguments);
    cljson_write_error(d->error, d->error_capacity, "invalid JSON at byte %zu: %s",
                       (size_t)(at - d->start), detail);
    d->failed = 1;
    return 0;
}

// Describes the byte at `at` for a message: 'x' when printable, 0xNN otherwise, or the end.
static const char *describe_byte(const decoder *d, const unsigned char *at, char *text,
                                 size_t capacity) {
    if (at >= d->end) {
        return "end of input";
    }
    if (*at >= 0x20 && *at < 0x7F) {
        snprintf(text, capacity, "character '%c'", *at);
    } else {
        snprintf(text, capacity, "byte 0x%02X", *at);
    }
    return text;
}

static inline const unsigned char *skip_whitespace(const unsigned char *p,
                                                   const unsigned char *end) {
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) {
        p++;
    }
    return p;
}

static inline int is_digit(unsigned char c) {
    return c >= '0' && c <= '9';
}

static int hex_value(unsigned char c) {
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

// Reads the four hex digits of a \u escape that starts at `escape` (the backslash).
// Returns the code unit, or -1 when the digits are missing or invalid.
static long read_code_unit(const unsigned char *escape, const unsigned char *end) {
    long unit = 0;

    if (end - escape < 6) {
        return -1;
    }
    for (int i = 2; i < 6; i++) {
        int digit = hex_value(escape[i]);
        if (digit < 0) {
            return -1;
        }
        unit = unit * 16 + digit;
    }
    return unit;
}

static size_t encode_utf8(unsigned long code_point, char *out) {
    if (code_point < 0x80) {
        out[0] = (char)code_point;
        return 1;
    }
    if (code_point < 0x800) {
        out[0] = (char)(0xC0 | (code_point >> 6));
        out[1] = (char)(0x80 | (code_point & 0x3F));
        return 2;
    }
    if (code_point < 0x10000) {
        out[0] = (char)(0xE0 | (code_point >> 12));
        out[1] = (char)(0x80 | ((code_point >> 6) & 0x3F));
        out[2] = (char)(0x80 | (code_point & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (code_point >> 18));
    out[1] = (char)(0x80 | ((code_point >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((code_point >> 6) & 0x3F));
    out[3] = (char)(0x80 | (code_point & 0x3F));
    return 4;
}

// Advances over string content that needs no decoding: printable ASCII and well-formed UTF-8.
// Returns the position of the first '"', '\' or control character, or `end`. Returns NULL
// after recording an error when a byte sequence is not valid UTF-8.
static const unsigned char *scan_plain_run(decoder *d, const unsigned char *p) {
    const unsigned char *end = d->end;

    while (p < end) {
        unsigned char byte_class = cljson_byte_class[*p];
        if (byte_class == CLJSON_BYTE_PLAIN) {
            p++;
        } else if (byte_class == CLJSON_BYTE_LEAD) {
            size_t length = cljson_utf8_sequence_length(p, end);
            if (length == 0) {
                decode_fail(d, p, "invalid UTF-8 sequence in string");
                return NULL;
            }
            p += length;
        } else {
            break;
        }
    }
    return p;
}

// Decodes one escape sequence at `p` (the backslash) into the buffer and returns the position
// after it, or NULL after recording an error.
static const unsigned char *decode_escape(decoder *d, const unsigned char *p, luaL_Buffer *buffer) {
    const unsigned char *end = d->end;
    char text[16];

    if (end - p < 2) {
        decode_fail(d, p, "string is not terminated");
        return NULL;
    }
    switch (p[1]) {
    case '"':  luaL_addchar(buffer, '"');  return p + 2;
    case '\\': luaL_addchar(buffer, '\\'); return p + 2;
    case '/':  luaL_addchar(buffer, '/');  return p + 2;
    case 'b':  luaL_addchar(buffer, '\b'); return p + 2;
    case 'f':  luaL_addchar(buffer, '\f'); return p + 2;
    case 'n':  luaL_addchar(buffer, '\n'); return p + 2;
    case 'r':  luaL_addchar(buffer, '\r'); return p + 2;
    case 't':  luaL_addchar(buffer, '\t'); return p + 2;
    case 'u':
        break;
    default:
        decode_fail(d, p, "invalid escape sequence: backslash followed by %s",
                    describe_byte(d, p + 1, text, sizeof text));
        return NULL;
    }

    long unit = read_code_unit(p, end);
    if (unit < 0) {
        decode_fail(d, p, "invalid \\u escape: expected 4 hex digits");
        return NULL;
    }
    unsigned long code_point = (unsigned long)unit;
    const unsigned char *next = p + 6;

    if (unit >= 0xDC00 && unit <= 0xDFFF) {
        decode_fail(d, p, "unpaired surrogate \\u%04lX: a low surrogate must follow a high one",
                    code_point);
        return NULL;
    }
    if (unit >= 0xD800 && unit <= 0xDBFF) {
        long low = (end - next >= 2 && next[0] == '\\' && next[1] == 'u')
                       ? read_code_unit(next, end)
                       : -1;
        if (low < 0xDC00 || low > 0xDFFF) {
            decode_fail(d, p, "unpaired surrogate \\u%04lX: a low surrogate \\uDC00..\\uDFFF "
                        "must follow it", code_point);
            return NULL;
        }
        code_point = 0x10000 + (((unsigned long)unit - 0xD800) << 10) +
                     ((unsigned long)low - 0xDC00);
        next += 6;
    }

    char utf8[4];
    luaL_addlstring(buffer, utf8, encode_utf8(code_point, utf8));
    return next;
}

// Decodes the rest of a string that contains an escape. `content` is the first byte after the
// opening quote and `p` the first backslash.
static const unsigned char *decode_escaped_string(lua_State *L, decoder *d,
                                                  const unsigned char *opening_quote,
                                                  const unsigned char *content,
                                                  const unsigned char *p) {
    luaL_Buffer buffer;

    luaL_buffinit(L, &buffer);
    luaL_addlstring(&buffer, (const char *)content, (size_t)(p - content));
    for (;;) {
        if (p == d->end) {
            decode_fail(d, opening_quote, "string is not terminated");
            return NULL;
        }
        if (*p == '"') {
            luaL_pushresult(&buffer);
            return p + 1;
        }
        if (*p == '\\') {
            p = decode_escape(d, p, &buffer);
        } else if (*p < 0x20) {
            decode_fail(d, p, "control character 0x%02X in string must be escaped", *p);
            return NULL;
        } else {
            const unsigned char *run = p;
            p = scan_plain_run(d, p);
            if (p != NULL) {
                luaL_addlstring(&buffer, (const char *)run, (size_t)(p - run));
            }
        }
        if (p == NULL) {
            return NULL;
        }
    }
}

// Pushes the string whose opening quote is at `p` and returns the position after the closing
// quote, or NULL after recording an error. Strings without escapes are pushed straight from
// the input.
static inline const unsigned char *decode_string(lua_State *L, decoder *d,
                                                 const unsigned char *p) {
    const unsigned char *content = p + 1;
    const unsigned char *q = scan_plain_run(d, content);

    if (q == NULL) {
        return NULL;
    }
    if (q == d->end) {
        decode_fail(d, p, "string is not terminated");
        return NULL;
    }
    if (*q == '"') {
        lua_pushlstring(L, (const char *)content, (size_t)(q - content));
        return q + 1;
    }
    if (*q == '\\') {
        return decode_escaped_string(L, d, p, content, q);
    }
    decode_fail(d, q, "control character 0x%02X in string must be escaped", *q);
    return NULL;
}

// Converts a number token with a fraction or exponent, or an integer beyond int64, with strtod.
// glibc's strtod rounds correctly, and JSONCodecTests checks it against Swift's Double parser.
// The token is copied because the input need not be NUL-terminated, and its '.' is replaced by
// the locale's decimal point, which strtod expects.
static int push_number_with_strtod(lua_State *L, decoder *d, const unsigned char *token,
                                   size_t length) {
    char copy[NUMBER_COPY_MAX];
    char *text = copy;
    int pushed_block = 0;
    char decimal_point = localeconv()->decimal_point[0];

    if (length >= sizeof copy) {
        // The collector frees the block even if an error unwinds past this point.
        text = lua_newuserdatauv(L, length + 1, 0);
        pushed_block = 1;
    }
    memcpy(text, token, length);
    text[length] = '\0';
    if (decimal_point != '.') {
        char *point = memchr(text, '.', length);
        if (point != NULL) {
            *point = decimal_point;
        }
    }

    double value = strtod(text, NULL);
    if (pushed_block) {
        lua_pop(L, 1);
    }
    if (isinf(value)) {
        return decode_fail(d, token, "number %.*s is out of range for a 64-bit float",
                           length > 40 ? 40 : (int)length, (const char *)token);
    }
    lua_pushnumber(L, value);
    return 1;
}

// Pushes the number that starts at `p` and returns the position after it, or NULL after
// recording an error. The grammar is RFC 8259's: -? (0 | [1-9][0-9]*) (.[0-9]+)? ([eE][+-]?[0-9]+)?
static const unsigned char *decode_number(lua_State *L, decoder *d, const unsigned char *p) {
    const unsigned char *token = p;
    const unsigned char *end = d->end;
    int negative = 0;
    int is_float = 0;
    int mantissa_overflow = 0;
    uint64_t mantissa = 0;   // all significant digits, integer and fraction part together
    long decimal_exponent = 0;

    if (*p == '-') {
        negative = 1;
        p++;
        if (p == end || !is_digit(*p)) {
            decode_fail(d, token, "invalid number: expected a digit after '-'");
            return NULL;
        }
    }

    if (*p == '0') {
        p++;
        if (p < end && is_digit(*p)) {
            decode_fail(d, token, "invalid number: leading zeros are not allowed");
            return NULL;
        }
    } else {
        for (; p < end && is_digit(*p); p++) {
            if (__builtin_mul_overflow(mantissa, 10, &mantissa) ||
                __builtin_add_overflow(mantissa, (uint64_t)(*p - '0'), &mantissa)) {
                mantissa_overflow = 1;
            }
        }
    }

    if (p < end && *p == '.') {
        is_float = 1;
        p++;
        if (p == end || !is_digit(*p)) {
            decode_fail(d, token, "invalid number: expected a digit after '.'");
            return NULL;
        }
        for (; p < end && is_digit(*p); p++) {
            if (__builtin_mul_overflow(mantissa, 10, &mantissa) ||
                __builtin_add_overflow(mantissa, (uint64_t)(*p - '0'), &mantissa)) {
                mantissa_overflow = 1;
            }
            decimal_exponent--;
        }
    }

    if (p < end && (*p == 'e' || *p == 'E')) {
        long exponent = 0;
        int exponent_negative = 0;

        is_float = 1;
        p++;
        if (p < end && (*p == '+' || *p == '-')) {
            exponent_negative = (*p == '-');
            p++;
        }
        if (p == end || !is_digit(*p)) {
            decode_fail(d, token, "invalid number: expected a digit in the exponent");
            return NULL;
        }
        for (; p < end && is_digit(*p); p++) {
            if (exponent < 100000) {   // larger exponents only matter to strtod
                exponent = exponent * 10 + (*p - '0');
            }
        }
        decimal_exponent += exponent_negative ? -exponent : exponent;
    }

    if (!is_float && !mantissa_overflow) {
        if (!negative && mantissa <= (uint64_t)INT64_MAX) {
            lua_pushinteger(L, (lua_Integer)mantissa);
            return p;
        }
        if (negative && mantissa <= (uint64_t)INT64_MAX + 1) {
            lua_pushinteger(L, mantissa == (uint64_t)INT64_MAX + 1 ? (lua_Integer)INT64_MIN
                                                                   : -(lua_Integer)mantissa);
            return p;
        }
    }

    if (!mantissa_overflow && mantissa <= FAST_MANTISSA_MAX &&
        decimal_exponent >= -FAST_POW10_MAX && decimal_exponent <= FAST_POW10_MAX) {
        double value = (double)mantissa;
        if (decimal_exponent < 0) {
            value /= exact_powers_of_ten[-decimal_exponent];
        } else {
            value *= exact_powers_of_ten[decimal_exponent];
        }
        lua_pushnumber(L, negative ? -value : value);
        return p;
    }

    if (!push_number_with_strtod(L, d, token, (size_t)(p - token))) {
        return NULL;
    }
    return p;
}

// Pushes a record for a new array or object, after checking the depth limit and reserving the
// Lua stack slots that the container may use. Returns NULL after recording an error.
static open_container *push_container(lua_State *L, decoder *d, const unsigned char *at,
                                      int is_object) {
    if (d->depth == d->max_depth) {
        decode_fail(d, at, "nesting is deeper than the limit of %zu levels", d->max_depth);
        return NULL;
    }
    if (!lua_checkstack(L, SLOTS_PER_LEVEL)) {
        decode_fail(d, at, "nesting is deeper than the Lua stack allows");
        return NULL;
    }
    if (d->depth == d->capacity) {
        // Records beyond the inline ones live in a userdata, which the collector frees even
        // if an error unwinds the decode.
        size_t capacity = d->capacity * 2;
        open_container *grown = lua_newuserdatauv(L, capacity * sizeof *grown, 0);
        memcpy(grown, d->containers, d->depth * sizeof *grown);
        lua_replace(L, CONTAINERS_SLOT);
        d->containers = grown;
        d->capacity = capacity;
    }
    open_container *container = &d->containers[d->depth++];
    container->is_object = is_object;
    container->is_direct = 0;
    container->base = lua_gettop(L);
    container->count = 0;
    return container;
}

// Creates the table for a container whose members wait on the stack above its base, fills it
// in document order (so a repeated key keeps its last value) and leaves it alone at base + 1.
static void build_table(lua_State *L, const open_container *container, int size_hint) {
    int first = container->base + 1;
    int count = (int)container->count;
    int table;

    if (container->is_object) {
        lua_createtable(L, 0, size_hint);
        table = lua_gettop(L);
        for (int i = 0; i < count; i++) {
            lua_pushvalue(L, first + 2 * i);
            lua_pushvalue(L, first + 2 * i + 1);
            lua_rawset(L, table);
        }
    } else {
        lua_createtable(L, size_hint, 0);
        table = lua_gettop(L);
        lua_pushvalue(L, ARRAY_METATABLE_SLOT);
        lua_setmetatable(L, table);
        for (int i = 0; i < count; i++) {
            lua_pushvalue(L, first + i);
            lua_rawseti(L, table, i + 1);
        }
    }
    lua_copy(L, table, first);
    lua_settop(L, first);
}

// The protected part of cljson_decode. Returns 1 value on success, or 0 values after
// recording a parse error, which makes lua_pcall drop every partial table.
static int decode_protected(lua_State *L) {
    decoder *d = lua_touserdata(L, DECODER_SLOT);
    const unsigned char *p = d->start;
    const unsigned char *end = d->end;
    open_container inline_containers[INLINE_CONTAINERS];
    open_container *container;
    char text[24];

    d->containers = inline_containers;
    d->capacity = INLINE_CONTAINERS;
    d->depth = 0;
    cljson_push_array_metatable(L);   // ARRAY_METATABLE_SLOT
    lua_pushnil(L);                   // CONTAINERS_SLOT, until the inline records run out

value:
    p = skip_whitespace(p, end);
    if (p == end) {
        return decode_fail(d, p, "unexpected end of input, expected a value");
    }
    switch (*p) {
    case '{':
        if (push_container(L, d, p, 1) == NULL) {
            return 0;
        }
        p = skip_whitespace(p + 1, end);
        if (p < end && *p == '}') {
            p++;
            goto container_closed;
        }
        goto object_key;
    case '[':
        if (push_container(L, d, p, 0) == NULL) {
            return 0;
        }
        p = skip_whitespace(p + 1, end);
        if (p < end && *p == ']') {
            p++;
            goto container_closed;
        }
        goto value;
    case '"':
        p = decode_string(L, d, p);
        if (p == NULL) {
            return 0;
        }
        goto value_done;
    case 't':
        if (end - p >= 4 && memcmp(p, "true", 4) == 0) {
            lua_pushboolean(L, 1);
            p += 4;
            goto value_done;
        }
        return decode_fail(d, p, "invalid literal, expected 'true'");
    case 'f':
        if (end - p >= 5 && memcmp(p, "false", 5) == 0) {
            lua_pushboolean(L, 0);
            p += 5;
            goto value_done;
        }
        return decode_fail(d, p, "invalid literal, expected 'false'");
    case 'n':
        if (end - p >= 4 && memcmp(p, "null", 4) == 0) {
            cljson_push_null(L);
            p += 4;
            goto value_done;
        }
        return decode_fail(d, p, "invalid literal, expected 'null'");
    default:
        if (*p == '-' || is_digit(*p)) {
            p = decode_number(L, d, p);
            if (p == NULL) {
                return 0;
            }
            goto value_done;
        }
        return decode_fail(d, p, "unexpected %s, expected a value",
                           describe_byte(d, p, text, sizeof text));
    }

object_key:
    if (p == end || *p != '"') {
        return decode_fail(d, p, "expected '\"' to start an object key, found %s",
                           describe_byte(d, p, text, sizeof text));
    }
    p = decode_string(L, d, p);
    if (p == NULL) {
        return 0;
    }
    p = skip_whitespace(p, end);
    if (p == end || *p != ':') {
        return decode_fail(d, p, "expected ':' after object key, found %s",
                           describe_byte(d, p, text, sizeof text));
    }
    p++;
    goto value;

container_closed:
    container = &d->containers[d->depth - 1];
    if (!container->is_direct) {
        build_table(L, container, (int)container->count);
    }
    d->depth--;

value_done:
    // The finished value is at the top of the stack, and for an object its key is below it.
    if (d->depth == 0) {
        p = skip_whitespace(p, end);
        if (p != end) {
            return decode_fail(d, p, "unexpected %s after the JSON value",
                               describe_byte(d, p, text, sizeof text));
        }
        return 1;
    }
    container = &d->containers[d->depth - 1];
    container->count++;
    p = skip_whitespace(p, end);

    if (container->is_object) {
        if (container->is_direct) {
            lua_rawset(L, container->base + 1);
        } else if (container->count == PENDING_MEMBERS_MAX) {
            build_table(L, container, 2 * PENDING_MEMBERS_MAX);
            container->is_direct = 1;
        }
        if (p < end && *p == ',') {
            p = skip_whitespace(p + 1, end);
            goto object_key;
        }
        if (p < end && *p == '}') {
            p++;
            goto container_closed;
        }
        return decode_fail(d, p, "expected ',' or '}' after object member, found %s",
                           describe_byte(d, p, text, sizeof text));
    }

    if (container->is_direct) {
        lua_rawseti(L, container->base + 1, container->count);
    } else if (container->count == PENDING_MEMBERS_MAX) {
        build_table(L, container, 2 * PENDING_MEMBERS_MAX);
        container->is_direct = 1;
    }
    if (p < end && *p == ',') {
        p++;
        goto value;
    }
    if (p < end && *p == ']') {
        p++;
        goto container_closed;
    }
    return decode_fail(d, p, "expected ',' or ']' after array element, found %s",
                       describe_byte(d, p, text, sizeof text));
}

int cljson_decode(lua_State *L, const char *bytes, size_t length, const cljson_limits *limits,
                  char *error, size_t error_capacity) {
    size_t max_depth = CLJSON_DEFAULT_MAX_DEPTH;
    size_t max_bytes = 0;

    if (limits != NULL) {
        if (limits->max_depth != 0) {
            max_depth = limits->max_depth;
        }
        max_bytes = limits->max_bytes;
    }
    if (max_bytes != 0 && length > max_bytes) {
        cljson_write_error(error, error_capacity,
                           "JSON input of %zu bytes is larger than the limit of %zu bytes",
                           length, max_bytes);
        return 0;
    }
    if (!lua_checkstack(L, 3)) {
        cljson_write_error(error, error_capacity, "JSON decode failed: the Lua stack is full");
        return 0;
    }

    decoder d = {
        .start = (const unsigned char *)(bytes != NULL ? bytes : ""),
        .end = (const unsigned char *)(bytes != NULL ? bytes : "") + length,
        .max_depth = max_depth,
        .error = error,
        .error_capacity = error_capacity,
        .failed = 0,
    };

    // Neither push allocates, so nothing can raise outside the protected call.
    lua_pushcfunction(L, decode_protected);
    lua_pushlightuserdata(L, &d);
    int status = lua_pcall(L, 1, 1, 0);
    if (status == LUA_OK && !d.failed) {
        return 1;
    }
    if (status != LUA_OK) {
        const char *message = lua_tostring(L, -1);
        cljson_write_error(error, error_capacity, "JSON decode failed: %s",
                           message != NULL ? message : "error object is not a string");
    }
    lua_pop(L, 1);
    return 0;
}
