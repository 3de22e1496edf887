// Lua values to compact JSON text.
//
// The encoder is iterative: each open table has a frame that records where the traversal is
// and which child is being encoded, so error messages can name the path of the bad value.
// It reads tables with raw access (no __index or __pairs) and never calls a function that can
// raise a Lua error, so it needs no protected call. Its own memory (the output buffer, deep
// frame arrays and sorted key lists) comes from malloc.
#include "internal.h"

#include <locale.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// Nesting levels whose frames fit in the encoder itself. Deeper values use a heap array.
#define INLINE_FRAMES 32

// Stack slots that one open table may use at once besides its sorted keys.
#define SLOTS_PER_LEVEL 4

enum frame_kind {
    FRAME_ARRAY,
    FRAME_OBJECT,          // keys in lua_next order
    FRAME_SORTED_OBJECT,   // keys collected on the Lua stack and sorted bytewise
};

typedef struct sorted_key {
    const char *bytes;
    size_t length;
    int stack_index;   // a copy of the key that keeps it alive and serves for lua_rawget
} sorted_key;

typedef struct encode_frame {
    enum frame_kind kind;
    int table_index;      // absolute stack index of the table
    const void *table;    // lua_topointer of the table, for cycle detection
    lua_Integer next;     // the next Lua index (array), or the members written so far (objects)
    lua_Integer count;    // the length (array), or the number of keys (sorted object)
    sorted_key *keys;     // sorted object only, owned by the frame

    // The child being encoded, for error paths.
    int has_child;
    lua_Integer child_index;
    const char *child_key;
    size_t child_key_length;
} encode_frame;

typedef struct encoder {
    lua_State *L;
    cljson_buffer *out;
    int flags;
    size_t max_depth;
    int array_metatable_index;   // 0 when no array has been tagged in this state
    encode_frame *frames;
    size_t depth;
    size_t frame_capacity;
    char *error;
    size_t error_capacity;
    encode_frame inline_frames[INLINE_FRAMES];
} encoder;

typedef enum string_status {
    STRING_OK,
    STRING_INVALID_UTF8,
    STRING_OUT_OF_MEMORY,
} string_status;

// A bounded writer over the caller's error buffer. Text past the capacity is dropped.
typedef struct text_writer {
    char *data;
    size_t capacity;
    size_t length;
} text_writer;

static void writer_append(text_writer *writer, const char *bytes, size_t length) {
    if (writer->data == NULL || writer->capacity == 0) {
        return;
    }
    size_t room = writer->capacity - 1 - writer->length;
    if (length > room) {
        length = room;
    }
    memcpy(writer->data + writer->length, bytes, length);
    writer->length += length;
    writer->data[writer->length] = '\0';
}

__attribute__((format(printf, 2, 0)))
static void writer_vprintf(text_writer *writer, const char *format, va_list arguments) {
    char text[256];
    int length = vsnprintf(text, sizeof text, format, arguments);
    if (length > 0) {
        writer_append(writer, text, (size_t)length < sizeof text ? (size_t)length : sizeof text - 1);
    }
}

__attribute__((format(printf, 2, 3)))
static void writer_printf(text_writer *writer, const char *format, ...) {
    va_list arguments;
    va_start(arguments, format);
    writer_vprintf(writer, format, arguments);
    va_end(arguments);
}

static int is_identifier(const char *key, size_t length) {
    if (length == 0) {
        return 0;
    }
    for (size_t i = 0; i < length; i++) {
        unsigned char c = (unsigned char)key[i];
        int letter = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
        if (!letter && (i == 0 || c < '0' || c > '9')) {
            return 0;
        }
    }
    return 1;
}

// Writes `.key` for identifier keys and `["key"]` otherwise. Inside the brackets '"' and '\' are
// escaped, control characters become \u00XX and bytes of invalid UTF-8 become \xNN.
static void write_key_segment(text_writer *writer, const char *key, size_t length) {
    if (is_identifier(key, length)) {
        writer_append(writer, ".", 1);
        writer_append(writer, key, length);
        return;
    }
    const unsigned char *p = (const unsigned char *)key;
    const unsigned char *end = p + length;
    writer_append(writer, "[\"", 2);
    while (p < end) {
        if (*p == '"' || *p == '\\') {
            writer_append(writer, "\\", 1);
            writer_append(writer, (const char *)p, 1);
            p++;
        } else if (*p < 0x20) {
            writer_printf(writer, "\\u%04X", *p);
            p++;
        } else if (*p < 0x80) {
            writer_append(writer, (const char *)p, 1);
            p++;
        } else {
            size_t sequence = cljson_utf8_sequence_length(p, end);
            if (sequence == 0) {
                writer_printf(writer, "\\x%02X", *p);
                p++;
            } else {
                writer_append(writer, (const char *)p, sequence);
                p += sequence;
            }
        }
    }
    writer_append(writer, "\"]", 2);
}

// Writes the path of the value being encoded: `$`, then one segment per open table. Array
// segments use the Lua index (1-based), as the table itself does.
static void write_path(text_writer *writer, const encoder *e) {
    writer_append(writer, "$", 1);
    for (size_t i = 0; i < e->depth; i++) {
        const encode_frame *frame = &e->frames[i];
        if (!frame->has_child) {
            break;
        }
        if (frame->kind == FRAME_ARRAY) {
            writer_printf(writer, "[%lld]", (long long)frame->child_index);
        } else {
            write_key_segment(writer, frame->child_key, frame->child_key_length);
        }
    }
}

// Records "cannot encode VALUE_KIND at PATH: REASON" for the value being encoded and returns 0.
__attribute__((format(printf, 3, 4)))
static int encode_fail(encoder *e, const char *value_kind, const char *reason_format, ...) {
    text_writer writer = {e->error, e->error_capacity, 0};
    va_list arguments;

    if (writer.data != NULL && writer.capacity > 0) {
        writer.data[0] = '\0';
    }
    writer_printf(&writer, "cannot encode %s at ", value_kind);
    write_path(&writer, e);
    writer_append(&writer, ": ", 2);
    va_start(arguments, reason_format);
    writer_vprintf(&writer, reason_format, arguments);
    va_end(arguments);
    return 0;
}

static int fail_out_of_memory(encoder *e, size_t requested) {
    cljson_write_error(e->error, e->error_capacity,
                       "JSON encode failed: out of memory for an output buffer of %zu bytes",
                       requested);
    return 0;
}

// Describes a table key for a message: its value for numbers and booleans, the quoted start
// of a string, or its type name.
static const char *describe_key(lua_State *L, int index, char *text, size_t capacity) {
    switch (lua_type(L, index)) {
    case LUA_TNUMBER:
        if (lua_isinteger(L, index)) {
            snprintf(text, capacity, "%lld", (long long)lua_tointeger(L, index));
        } else {
            snprintf(text, capacity, "%.17g", (double)lua_tonumber(L, index));
        }
        return text;
    case LUA_TBOOLEAN:
        return lua_toboolean(L, index) ? "true" : "false";
    case LUA_TSTRING: {
        size_t length;
        const char *key = lua_tolstring(L, index, &length);
        snprintf(text, capacity, "\"%.*s%s\"", length > 40 ? 40 : (int)length, key,
                 length > 40 ? "..." : "");
        return text;
    }
    default:
        snprintf(text, capacity, "of type %s", lua_typename(L, lua_type(L, index)));
        return text;
    }
}

// Makes room for `extra` more bytes, growing the capacity geometrically.
static int reserve(encoder *e, size_t extra) {
    cljson_buffer *out = e->out;

    if (out->capacity - out->length >= extra) {
        return 1;
    }
    if (extra > SIZE_MAX - out->length) {
        return fail_out_of_memory(e, SIZE_MAX);
    }
    size_t needed = out->length + extra;
    size_t capacity = out->capacity != 0 ? out->capacity : 256;
    while (capacity < needed) {
        capacity = capacity > SIZE_MAX / 2 ? needed : capacity * 2;
    }
    char *data = realloc(out->data, capacity);
    if (data == NULL) {
        return fail_out_of_memory(e, capacity);
    }
    out->data = data;
    out->capacity = capacity;
    return 1;
}

static int append(encoder *e, const char *bytes, size_t length) {
    if (!reserve(e, length)) {
        return 0;
    }
    memcpy(e->out->data + e->out->length, bytes, length);
    e->out->length += length;
    return 1;
}

static inline int append_byte(encoder *e, char byte) {
    if (e->out->length == e->out->capacity && !reserve(e, 1)) {
        return 0;
    }
    e->out->data[e->out->length++] = byte;
    return 1;
}

// Writes the decimal digits of `value` to `text` (at least 20 bytes) and returns their count.
static int format_unsigned(uint64_t value, char *text) {
    char reversed[20];
    int count = 0;

    do {
        reversed[count++] = (char)('0' + value % 10);
        value /= 10;
    } while (value != 0);
    for (int i = 0; i < count; i++) {
        text[i] = reversed[count - 1 - i];
    }
    return count;
}

static int append_integer(encoder *e, lua_Integer value) {
    char text[24];
    int length = 0;
    // The magnitude is computed unsigned so that the minimum int64 does not overflow.
    uint64_t magnitude = value < 0 ? 0 - (uint64_t)value : (uint64_t)value;

    if (value < 0) {
        text[length++] = '-';
    }
    length += format_unsigned(magnitude, text + length);
    return append(e, text, (size_t)length);
}

// Powers of ten that are exact doubles.
static const double exact_powers_of_ten[] = {
    1e0, 1e1, 1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
    1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
};

// Writes `value` in fixed notation when it is the double nearest to m / 10^k for an integer m
// below 10^15, which covers prices and quantities with a few decimals. Returns the length, or
// 0 when the value needs the general path.
//
// The text then equals what append_float's %.15g step writes. m / 10^k is within half an ulp
// (2^-53 relative) of the value, much closer than half a step of the 15-digit grid (5e-16
// relative), so %.15g rounds to exactly these digits. Between 1e-4 and 1e15, %g uses fixed
// notation. strtod reads the text back as the same double, because it and the division below
// both round the same rational number correctly. JSONCodecTests compares both paths.
static int format_short_decimal(double value, char *text) {
    double magnitude = fabs(value);

    if (!(magnitude >= 1e-4 && magnitude < 1e15)) {
        return 0;
    }
    for (int decimals = 0; decimals < (int)(sizeof exact_powers_of_ten / sizeof(double));
         decimals++) {
        double scaled = magnitude * exact_powers_of_ten[decimals];
        if (scaled >= 1e15) {
            return 0;
        }
        double mantissa = (double)(int64_t)(scaled + 0.5);
        if (mantissa / exact_powers_of_ten[decimals] != magnitude) {
            continue;
        }

        char digits[24];
        int digit_count = format_unsigned((uint64_t)mantissa, digits);
        int length = 0;
        if (value < 0) {
            text[length++] = '-';
        }
        if (decimals == 0) {
            memcpy(text + length, digits, (size_t)digit_count);
            length += digit_count;
            text[length++] = '.';
            text[length++] = '0';
        } else if (digit_count > decimals) {
            int whole = digit_count - decimals;
            memcpy(text + length, digits, (size_t)whole);
            length += whole;
            text[length++] = '.';
            memcpy(text + length, digits + whole, (size_t)decimals);
            length += decimals;
        } else {
            text[length++] = '0';
            text[length++] = '.';
            for (int i = digit_count; i < decimals; i++) {
                text[length++] = '0';
            }
            memcpy(text + length, digits, (size_t)digit_count);
            length += digit_count;
        }
        return length;
    }
    return 0;
}

// Appends the shortest of %.15g, %.16g and %.17g that reads back as the same double, with ".0"
// added when the text would otherwise read as an integer.
static int append_float(encoder *e, double value) {
    char text[48];
    int length;

    if (!isfinite(value)) {
        return encode_fail(e, "number", "%s has no JSON representation",
                           isnan(value) ? "NaN" : "infinity");
    }
    length = format_short_decimal(value, text);
    if (length > 0) {
        return append(e, text, (size_t)length);
    }

    length = snprintf(text, sizeof text, "%.15g", value);
    if (strtod(text, NULL) != value) {
        length = snprintf(text, sizeof text, "%.16g", value);
        if (strtod(text, NULL) != value) {
            length = snprintf(text, sizeof text, "%.17g", value);
        }
    }

    // snprintf writes the locale's decimal point, and JSON needs '.'.
    char decimal_point = localeconv()->decimal_point[0];
    if (decimal_point != '.') {
        char *point = memchr(text, decimal_point, (size_t)length);
        if (point != NULL) {
            *point = '.';
        }
    }
    if (memchr(text, '.', (size_t)length) == NULL && memchr(text, 'e', (size_t)length) == NULL) {
        text[length++] = '.';
        text[length++] = '0';
    }
    return append(e, text, (size_t)length);
}

// Appends `bytes` as a quoted JSON string, escaping '"', '\' and control characters. Bytes from
// 0x80 up are copied as they are once they are checked to be well-formed UTF-8.
static string_status append_string(encoder *e, const char *bytes, size_t length,
                                   size_t *invalid_offset) {
    static const char hex_digits[] = "0123456789ABCDEF";
    const unsigned char *start = (const unsigned char *)bytes;
    const unsigned char *end = start + length;
    const unsigned char *p = start;
    const unsigned char *run = start;
    cljson_buffer *out = e->out;

    if (length > SIZE_MAX - 2 || !reserve(e, length + 2)) {
        return STRING_OUT_OF_MEMORY;
    }
    out->data[out->length++] = '"';
    while (p < end) {
        unsigned char byte_class = cljson_byte_class[*p];
        if (byte_class == CLJSON_BYTE_PLAIN) {
            p++;
            continue;
        }
        if (byte_class == CLJSON_BYTE_LEAD) {
            size_t sequence = cljson_utf8_sequence_length(p, end);
            if (sequence == 0) {
                *invalid_offset = (size_t)(p - start);
                return STRING_INVALID_UTF8;
            }
            p += sequence;
            continue;
        }

        memcpy(out->data + out->length, run, (size_t)(p - run));
        out->length += (size_t)(p - run);
        // Room for the longest escape (\u00XX), the rest of the string and the closing quote.
        if (!reserve(e, 6 + (size_t)(end - p) + 1)) {
            return STRING_OUT_OF_MEMORY;
        }
        char *escape = out->data + out->length;
        escape[0] = '\\';
        switch (*p) {
        case '"':  escape[1] = '"';  out->length += 2; break;
        case '\\': escape[1] = '\\'; out->length += 2; break;
        case '\b': escape[1] = 'b';  out->length += 2; break;
        case '\f': escape[1] = 'f';  out->length += 2; break;
        case '\n': escape[1] = 'n';  out->length += 2; break;
        case '\r': escape[1] = 'r';  out->length += 2; break;
        case '\t': escape[1] = 't';  out->length += 2; break;
        default:
            escape[1] = 'u';
            escape[2] = '0';
            escape[3] = '0';
            escape[4] = hex_digits[*p >> 4];
            escape[5] = hex_digits[*p & 0x0F];
            out->length += 6;
            break;
        }
        p++;
        run = p;
    }
    memcpy(out->data + out->length, run, (size_t)(p - run));
    out->length += (size_t)(p - run);
    out->data[out->length++] = '"';
    return STRING_OK;
}

static int append_key(encoder *e, const char *key, size_t length) {
    size_t invalid_offset = 0;
    switch (append_string(e, key, length, &invalid_offset)) {
    case STRING_OK:
        return 1;
    case STRING_INVALID_UTF8:
        return encode_fail(e, "object key", "invalid UTF-8 at byte %zu of the key",
                           invalid_offset);
    case STRING_OUT_OF_MEMORY:
        break;
    }
    return 0;
}

// Encodes the non-table value at the top of the stack and pops it.
static int encode_scalar(encoder *e) {
    lua_State *L = e->L;
    int ok = 1;

    switch (lua_type(L, -1)) {
    case LUA_TNIL:
        ok = append(e, "null", 4);
        break;
    case LUA_TBOOLEAN:
        ok = lua_toboolean(L, -1) ? append(e, "true", 4) : append(e, "false", 5);
        break;
    case LUA_TNUMBER:
        ok = lua_isinteger(L, -1) ? append_integer(e, lua_tointeger(L, -1))
                                  : append_float(e, (double)lua_tonumber(L, -1));
        break;
    case LUA_TSTRING: {
        size_t length;
        size_t invalid_offset = 0;
        const char *bytes = lua_tolstring(L, -1, &length);
        string_status status = append_string(e, bytes, length, &invalid_offset);
        if (status == STRING_INVALID_UTF8) {
            return encode_fail(e, "string", "invalid UTF-8 at byte %zu of the string",
                               invalid_offset);
        }
        ok = (status == STRING_OK);
        break;
    }
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, -1) == cljson_null_marker()) {
            ok = append(e, "null", 4);
            break;
        }
        return encode_fail(e, "light userdata", "only json.null has a JSON representation");
    default:
        return encode_fail(e, lua_typename(L, lua_type(L, -1)),
                           "only nil, booleans, numbers, strings, tables and json.null "
                           "have a JSON representation");
    }
    if (ok) {
        lua_pop(L, 1);
    }
    return ok;
}

static encode_frame *push_frame(encoder *e, enum frame_kind kind, int table_index) {
    if (e->depth == e->frame_capacity) {
        size_t capacity = e->frame_capacity * 2;
        encode_frame *frames;
        if (e->frames == e->inline_frames) {
            frames = malloc(capacity * sizeof *frames);
            if (frames != NULL) {
                memcpy(frames, e->inline_frames, e->depth * sizeof *frames);
            }
        } else {
            frames = realloc(e->frames, capacity * sizeof *frames);
        }
        if (frames == NULL) {
            fail_out_of_memory(e, capacity * sizeof *frames);
            return NULL;
        }
        e->frames = frames;
        e->frame_capacity = capacity;
    }
    encode_frame *frame = &e->frames[e->depth++];
    memset(frame, 0, sizeof *frame);
    frame->kind = kind;
    frame->table_index = table_index;
    frame->table = lua_topointer(e->L, table_index);
    return frame;
}

// Closes the innermost table: frees its keys and pops it with everything above it.
static void pop_frame(encoder *e) {
    encode_frame *frame = &e->frames[--e->depth];
    free(frame->keys);
    frame->keys = NULL;
    lua_settop(e->L, frame->table_index - 1);
}

// Checks that the keys of the table at `index` are exactly 1..length.
static int check_sequence(encoder *e, int index, lua_Integer length, int tagged) {
    lua_State *L = e->L;
    lua_Integer count = 0;
    char text[64];

    lua_pushnil(L);
    while (lua_next(L, index) != 0) {
        lua_pop(L, 1);
        if (lua_isinteger(L, -1)) {
            lua_Integer key = lua_tointeger(L, -1);
            if (key >= 1 && key <= length) {
                count++;
                continue;
            }
        }
        const char *key = describe_key(L, -1, text, sizeof text);
        int key_is_string = lua_type(L, -1) == LUA_TSTRING;
        lua_pop(L, 1);
        if (tagged) {
            return encode_fail(e, "table", "it is tagged as an array but has key %s outside "
                               "1..%lld", key, (long long)length);
        }
        if (key_is_string) {
            return encode_fail(e, "table", "it mixes the sequence keys 1..%lld with key %s, "
                               "so it is neither an array nor an object", (long long)length, key);
        }
        return encode_fail(e, "table", "key %s is outside the sequence 1..%lld (sparse array)",
                           key, (long long)length);
    }
    if (count != length) {
        return encode_fail(e, "table", "the sequence 1..%lld has holes: only %lld of its keys "
                           "are present (sparse array)", (long long)length, (long long)count);
    }
    return 1;
}

// Fails for a key that cannot be an object key. The key is at the top of the stack.
static int fail_non_string_key(encoder *e) {
    char text[64];
    const char *key = describe_key(e->L, -1, text, sizeof text);
    if (lua_isinteger(e->L, -1)) {
        return encode_fail(e, "table", "key %s is not a string, and the table has no key 1, so "
                           "it is not an array either (sparse array)", key);
    }
    return encode_fail(e, "table", "key %s is not a string, and object keys must be strings",
                       key);
}

static int compare_sorted_keys(const void *left, const void *right) {
    const sorted_key *a = left;
    const sorted_key *b = right;
    size_t shorter = a->length < b->length ? a->length : b->length;
    int order = memcmp(a->bytes, b->bytes, shorter);
    if (order != 0) {
        return order;
    }
    return (a->length > b->length) - (a->length < b->length);
}

// Opens an object whose keys are written in byte order. The keys are collected on the Lua stack
// above the table, which keeps them alive while the C array points into them.
static int open_sorted_object(encoder *e, int index) {
    lua_State *L = e->L;
    sorted_key *keys = NULL;
    size_t count = 0;
    size_t capacity = 0;

    lua_pushnil(L);
    while (lua_next(L, index) != 0) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING) {
            free(keys);
            return fail_non_string_key(e);
        }
        if (!lua_checkstack(L, SLOTS_PER_LEVEL)) {
            free(keys);
            return encode_fail(e, "table", "it has more keys than the Lua stack can hold for "
                               "sorting");
        }
        if (count == capacity) {
            size_t grown = capacity != 0 ? capacity * 2 : 16;
            sorted_key *larger = realloc(keys, grown * sizeof *keys);
            if (larger == NULL) {
                free(keys);
                return fail_out_of_memory(e, grown * sizeof *keys);
            }
            keys = larger;
            capacity = grown;
        }
        keys[count].bytes = lua_tolstring(L, -1, &keys[count].length);
        keys[count].stack_index = lua_gettop(L);
        count++;
        // This copy drives lua_next and the one below it stays as the anchor.
        lua_pushvalue(L, -1);
    }

    if (count == 0) {
        lua_settop(L, index - 1);
        return append(e, "{}", 2);
    }
    qsort(keys, count, sizeof *keys, compare_sorted_keys);
    encode_frame *frame = push_frame(e, FRAME_SORTED_OBJECT, index);
    if (frame == NULL) {
        free(keys);
        return 0;
    }
    frame->keys = keys;
    frame->count = (lua_Integer)count;
    return append_byte(e, '{');
}

// Opens the table at the top of the stack as an array or object frame after checking depth,
// cycles and keys. An empty sorted object is written at once and popped.
static int open_table(encoder *e) {
    lua_State *L = e->L;
    int index = lua_gettop(L);
    const void *table = lua_topointer(L, index);

    if (e->depth >= e->max_depth) {
        return encode_fail(e, "table", "nesting is deeper than the limit of %zu levels",
                           e->max_depth);
    }
    for (size_t i = 0; i < e->depth; i++) {
        if (e->frames[i].table == table) {
            return encode_fail(e, "table", "reference cycle: the table contains itself");
        }
    }
    if (!lua_checkstack(L, SLOTS_PER_LEVEL)) {
        return encode_fail(e, "table", "nesting is deeper than the Lua stack allows");
    }

    int tagged = 0;
    if (e->array_metatable_index != 0 && lua_getmetatable(L, index)) {
        tagged = lua_rawequal(L, -1, e->array_metatable_index);
        lua_pop(L, 1);
    }
    lua_Integer length = (lua_Integer)lua_rawlen(L, index);
    if (tagged || length > 0) {
        if (!check_sequence(e, index, length, tagged)) {
            return 0;
        }
        encode_frame *frame = push_frame(e, FRAME_ARRAY, index);
        if (frame == NULL) {
            return 0;
        }
        frame->next = 1;
        frame->count = length;
        return append_byte(e, '[');
    }
    if (e->flags & CLJSON_SORT_KEYS) {
        return open_sorted_object(e, index);
    }
    if (push_frame(e, FRAME_OBJECT, index) == NULL) {
        return 0;
    }
    lua_pushnil(L);   // the first key for lua_next
    return append_byte(e, '{');
}

// Encodes the value at the top of the stack: writes a scalar and pops it, or opens a table.
static int encode_value(encoder *e) {
    if (lua_type(e->L, -1) == LUA_TTABLE) {
        return open_table(e);
    }
    return encode_scalar(e);
}

// Steps the innermost open table once: writes one member or element, or closes the table.
static int encode_step(encoder *e) {
    lua_State *L = e->L;
    encode_frame *frame = &e->frames[e->depth - 1];

    switch (frame->kind) {
    case FRAME_ARRAY:
        if (frame->next > frame->count) {
            pop_frame(e);
            return append_byte(e, ']');
        }
        if (frame->next > 1 && !append_byte(e, ',')) {
            return 0;
        }
        frame->has_child = 1;
        frame->child_index = frame->next;
        lua_rawgeti(L, frame->table_index, frame->next++);
        return encode_value(e);

    case FRAME_OBJECT:
        // The stack is [... table key] here, and [... table key value] after lua_next.
        if (lua_next(L, frame->table_index) == 0) {
            pop_frame(e);
            return append_byte(e, '}');
        }
        if (lua_type(L, -2) != LUA_TSTRING) {
            frame->has_child = 0;
            lua_pop(L, 1);
            return fail_non_string_key(e);
        }
        frame->has_child = 1;
        frame->child_key = lua_tolstring(L, -2, &frame->child_key_length);
        if (frame->next++ > 0 && !append_byte(e, ',')) {
            return 0;
        }
        if (!append_key(e, frame->child_key, frame->child_key_length) ||
            !append_byte(e, ':')) {
            return 0;
        }
        return encode_value(e);

    case FRAME_SORTED_OBJECT: {
        if (frame->next == frame->count) {
            pop_frame(e);
            return append_byte(e, '}');
        }
        const sorted_key *key = &frame->keys[frame->next];
        frame->has_child = 1;
        frame->child_key = key->bytes;
        frame->child_key_length = key->length;
        if (frame->next++ > 0 && !append_byte(e, ',')) {
            return 0;
        }
        if (!append_key(e, key->bytes, key->length) || !append_byte(e, ':')) {
            return 0;
        }
        lua_pushvalue(L, key->stack_index);
        lua_rawget(L, frame->table_index);
        return encode_value(e);
    }
    }
    return 0;
}

int cljson_encode(lua_State *L, int index, cljson_buffer *out, int flags, size_t max_depth,
                  char *error, size_t error_capacity) {
    int top = lua_gettop(L);
    size_t original_length = out->length;
    encoder e;

    e.L = L;
    e.out = out;
    e.flags = flags;
    e.max_depth = max_depth != 0 ? max_depth : CLJSON_DEFAULT_MAX_DEPTH;
    e.array_metatable_index = 0;
    e.frames = e.inline_frames;
    e.depth = 0;
    e.frame_capacity = INLINE_FRAMES;
    e.error = error;
    e.error_capacity = error_capacity;

    if (lua_type(L, index) == LUA_TNONE) {
        cljson_write_error(error, error_capacity,
                           "JSON encode failed: stack index %d holds no value", index);
        return 0;
    }
    index = lua_absindex(L, index);
    if (!lua_checkstack(L, SLOTS_PER_LEVEL)) {
        cljson_write_error(error, error_capacity, "JSON encode failed: the Lua stack is full");
        return 0;
    }
    cljson_push_array_metatable_if_present(L);
    if (!lua_isnil(L, -1)) {
        e.array_metatable_index = lua_gettop(L);
    }

    lua_pushvalue(L, index);
    int ok = encode_value(&e);
    while (ok && e.depth > 0) {
        ok = encode_step(&e);
    }

    for (size_t i = 0; i < e.depth; i++) {
        free(e.frames[i].keys);
    }
    if (e.frames != e.inline_frames) {
        free(e.frames);
    }
    lua_settop(L, top);
    if (!ok) {
        out->length = original_length;
    }
    return ok;
}
