/* One positional read of a file range into memory, split across OpenMP threads.
 *
 * Why: a cache miss is a read of the expert's stored bytes, from the page cache or the disk, into its slab: a
 * copy the kernel makes on the calling core, while the decode's other OpenMP threads wait (a layer stalls on its
 * miss). Two cores copy about twice what one does: on the Xeon 4 MiB from the page cache took 228 us on two
 * threads against 440 on one (bench/bench_read.py, bench/results/read_split_xeon.md). The read runs in the same
 * OpenMP runtime as the kernels (torch's libgomp), so its threads are the ones that just ran the layer.
 *
 * prism_pread(fd, offset, length, dst, threads): reads [offset, offset + length) of fd into dst, each of
 * `threads` threads a pread loop over its share (64 KiB aligned; retried after EINTR and short reads).
 * Returns the bytes read (less than length only where the file ends first), or -errno of a failed pread. */
#define _XOPEN_SOURCE 700
#include <errno.h>
#include <stdint.h>
#include <unistd.h>
#include <omp.h>

#define RR_ALIGN 65536

int64_t prism_pread(int64_t fd, int64_t offset, int64_t length, void *dst, int64_t threads) {
    if (fd < 0 || offset < 0 || length < 0 || (length && !dst) || threads < 1) return -EINVAL;
    int64_t total = 0, failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(+ : total)
    {
        const int64_t n = omp_get_num_threads(), i = omp_get_thread_num();
        const int64_t share = ((length + n - 1) / n + RR_ALIGN - 1) / RR_ALIGN * RR_ALIGN;
        int64_t at = i * share < length ? i * share : length;
        const int64_t end = at + share < length ? at + share : length;
        while (at < end) {
            const ssize_t got = pread((int)fd, (char *)dst + at, (size_t)(end - at), (off_t)(offset + at));
            if (got < 0) {
                if (errno == EINTR) continue;
                __atomic_store_n(&failed, -(int64_t)errno, __ATOMIC_RELAXED);
                break;
            }
            if (got == 0) break; /* the file ends here */
            at += got;
            total += got;
        }
    }
    return failed ? failed : total;
}
