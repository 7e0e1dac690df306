/* Minimal assert.h for type-checking ring's C sources for macOS on Linux
 * (see TargetConditionals.h). */
#ifndef TRIPOD_ASSERT_SHIM
#define TRIPOD_ASSERT_SHIM
#define assert(x) ((void)0)
#define static_assert _Static_assert
#endif
