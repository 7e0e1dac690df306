/* ProcessPrng for Wine 8 (Debian bookworm's wine64), which has no
 * bcryptprimitives.dll: Rust's std (>= 1.78) imports it for random bytes.
 * Built next to tripod.exe for the Wine smoke test only; never shipped
 * (Windows 10 and later have the real DLL). Forwards to RtlGenRandom. */
#include <windows.h>
BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);
__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
  while (len > 0) {
    ULONG n = len > 0x10000000 ? 0x10000000 : (ULONG)len;
    if (!SystemFunction036(data, n)) return FALSE;
    data += n; len -= n;
  }
  return TRUE;
}
