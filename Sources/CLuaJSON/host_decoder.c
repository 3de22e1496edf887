#include "CLuaJSON.h"

// The decoder behind CLUA_RESULT_JSON: host functions hand back JSON bytes (state values) and
// the trampoline pushes them through this, raising a Lua error when they do not decode.
static int cljson_decode_or_raise(lua_State *L, const char *data, size_t length) {
    char error[256];
    cljson_limits limits = {0, 0};
    if (!cljson_decode(L, data, length, &limits, error, sizeof error)) {
        return luaL_error(L, "%s", error);
    }
    return 1;
}

void cljson_install_host_decoder(void) {
    clua_set_json_decoder(cljson_decode_or_raise);
}
