/*
 * ABI probe run on the build machine (x86_64): prints one "NAME VALUE" line
 * per ENTRY, or "NAME MISSING" when the installed <linux/kvm.h> lacks a
 * constant. tests/test_kvm_abi.py generates entries.h from serrinj's Python
 * tables, compiles this file against the system headers, runs it and compares.
 */
#include <stddef.h>
#include <stdio.h>
#include <linux/kvm.h>

#define ENTRY(name, expr) printf("%s %llu\n", #name, (unsigned long long)(expr));
#define MISSING(name) printf("%s MISSING\n", #name);

int main(void)
{
#include "entries.h"
	return 0;
}
