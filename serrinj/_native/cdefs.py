"""The C declarations serrinj's libc bindings use (parsed once, at generation time).

``scripts/gen_ffi.py`` turns them into ``_abi.py`` with cffi's out-of-line ABI
mode: a plain Python module holding the parsed types, so that importing the
bindings needs neither pycparser nor a C compiler (it saves ~30 ms of every
command's start-up, ten times that under emulation). Variadic libc functions
(``ioctl``, ``syscall``, ``prctl``) are declared variadic, and every argument
is passed as an explicit ``long`` so that the calling convention is unambiguous.
"""

CDEF = """
    typedef int pid_t;
    typedef long ssize_t;
    typedef unsigned long size_t;

    struct iovec { void *iov_base; size_t iov_len; };

    struct sock_filter { uint16_t code; uint8_t jt; uint8_t jf; uint32_t k; };
    struct sock_fprog { unsigned short len; struct sock_filter *filter; };

    int ioctl(int fd, unsigned long request, ...);
    long syscall(long number, ...);
    int prctl(int option, ...);
    pid_t waitpid(pid_t pid, int *wstatus, int options);
    ssize_t process_vm_readv(pid_t pid, const struct iovec *local_iov, unsigned long liovcnt,
                             const struct iovec *remote_iov, unsigned long riovcnt,
                             unsigned long flags);
    ssize_t process_vm_writev(pid_t pid, const struct iovec *local_iov, unsigned long liovcnt,
                              const struct iovec *remote_iov, unsigned long riovcnt,
                              unsigned long flags);
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
    int munmap(void *addr, size_t length);
    char *strerror(int errnum);
"""
