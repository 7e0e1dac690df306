/* Minimal string.h for type-checking ring's C sources for macOS on Linux
 * (see TargetConditionals.h). */
#ifndef TRIPOD_STRING_SHIM
#define TRIPOD_STRING_SHIM
#include <stddef.h>
void *memcpy(void *, const void *, size_t);
void *memmove(void *, const void *, size_t);
void *memset(void *, int, size_t);
int memcmp(const void *, const void *, size_t);
#endif
