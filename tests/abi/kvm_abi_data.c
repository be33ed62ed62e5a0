/*
 * ABI probe for a target that cannot run here (arm64): compiled with -S only.
 * Every ENTRY becomes a 64-bit constant "abi_NAME" in the assembly output, and
 * every MISSING a one-byte "abi_missing_NAME" marker; tests/test_kvm_abi.py
 * reads the values back from the .s file without executing anything.
 */
#include <stddef.h>
#include <linux/kvm.h>

#define ENTRY(name, expr) const unsigned long long abi_##name = (unsigned long long)(expr);
#define MISSING(name) const unsigned char abi_missing_##name = 0;

#include "entries.h"
