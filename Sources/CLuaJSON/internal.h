// Declarations shared by the decoder, the encoder and the Lua library of the JSON codec.
#ifndef CLUAJSON_INTERNAL_H
#define CLUAJSON_INTERNAL_H

#include "CLuaJSON.h"

#include <stdarg.h>

#define CLJSON_DEFAULT_MAX_DEPTH 64

// Byte classes for string scanning, shared by decode and encode.
enum {
    CLJSON_BYTE_PLAIN = 0,   // printable ASCII that needs no escape: 0x20..0x7F except '"' and '\'
    CLJSON_BYTE_SPECIAL = 1, // '"', '\' and the control characters 0x00..0x1F
    CLJSON_BYTE_LEAD = 2,    // 0x80..0xFF, the start (or a stray part) of a multi-byte sequence
};
extern const unsigned char cljson_byte_class[256];

// Returns the address that identifies the null sentinel (a light userdata).
const void *cljson_null_marker(void);

// Pushes the shared array metatable, creating and registering it on first use. May raise a
// memory error, so only protected code calls it.
void cljson_push_array_metatable(lua_State *L);

// Pushes the shared array metatable, or nil when no array has been tagged yet. Never raises.
void cljson_push_array_metatable_if_present(lua_State *L);

// Writes a formatted, NUL-terminated message into `error`, truncating it to `capacity`.
// Does nothing when `error` is NULL or `capacity` is 0.
void cljson_write_error(char *error, size_t capacity, const char *format, ...)
    __attribute__((format(printf, 3, 4)));

// Returns the length (2 to 4) of the well-formed UTF-8 sequence that starts at `p`, or 0 if the
// sequence is invalid. Invalid sequences are stray continuation bytes, overlong forms, UTF-16
// surrogates (U+D800..U+DFFF), code points above U+10FFFF and sequences cut off by `end`.
// `p[0]` must be 0x80 or above and `p` must be before `end`.
static inline size_t cljson_utf8_sequence_length(const unsigned char *p, const unsigned char *end) {
    size_t available = (size_t)(end - p);
    unsigned char lead = p[0];
    unsigned char low = 0x80;
    unsigned char high = 0xBF;

    if (lead >= 0xC2 && lead <= 0xDF) {
        return (available >= 2 && (p[1] & 0xC0) == 0x80) ? 2 : 0;
    }
    if (lead >= 0xE0 && lead <= 0xEF) {
        if (lead == 0xE0) {
            low = 0xA0;   // below this the code point fits in two bytes (overlong)
        } else if (lead == 0xED) {
            high = 0x9F;  // above this the code point is a surrogate
        }
        if (available < 3 || p[1] < low || p[1] > high || (p[2] & 0xC0) != 0x80) {
            return 0;
        }
        return 3;
    }
    if (lead >= 0xF0 && lead <= 0xF4) {
        if (lead == 0xF0) {
            low = 0x90;   // below this the code point fits in three bytes (overlong)
        } else if (lead == 0xF4) {
            high = 0x8F;  // above this the code point is beyond U+10FFFF
        }
        if (available < 4 || p[1] < low || p[1] > high || (p[2] & 0xC0) != 0x80 ||
            (p[3] & 0xC0) != 0x80) {
            return 0;
        }
        return 4;
    }
    return 0;
}

#endif
