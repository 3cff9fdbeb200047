/*
 * snapvm_guest.h: the C interface of the snapvm guest runtime.
 *
 * A C guest defines `void snapvm_init(void)` and links the static library
 * built from `snapvm-guest` with its `capi` feature (libsnapvm_guest_c.a, see
 * docs/guest-guide.md, "Guests in C and other languages"). The library
 * provides the entry point `_start`: it sets up the heap, calls
 * snapvm_init once, reports the VM ready, and then calls the exported
 * functions the host invokes, one at a time, on one thread.
 *
 * Conventions:
 * - Names (exports, host functions) are NUL-terminated UTF-8 strings.
 *   Bytes and messages are a pointer and a length; the pointer may be NULL
 *   when the length is 0.
 * - Functions that can fail return SNAPVM_OK or a SNAPVM_ERR_* code.
 * - Misuse a compiler cannot catch (a bad export name, output outside an
 *   exported function) stops the guest with a panic naming the problem; the
 *   host sees VmError::GuestPanic.
 *
 * No C library is needed. The library also defines memcpy, memmove,
 * memset, memcmp, bcmp and strlen (the compiler may emit calls to the first
 * four even with -ffreestanding).
 *
 * Build flags: -ffreestanding -fno-stack-protector -fno-pic -fno-pie;
 * link with -nostdlib -nostartfiles -static -no-pie.
 */
#ifndef SNAPVM_GUEST_H
#define SNAPVM_GUEST_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__cplusplus)
#define SNAPVM_NORETURN [[noreturn]]
#elif defined(__GNUC__) || defined(__clang__)
#define SNAPVM_NORETURN __attribute__((noreturn))
#else
#define SNAPVM_NORETURN _Noreturn
#endif

/* Status codes. */
#define SNAPVM_OK 0
/* The result does not fit the buffer; the length written is the size
 * needed. After snapvm_host_call: fetch it with snapvm_host_result. */
#define SNAPVM_ERR_TOO_SMALL 1
/* The host has no function of that name. */
#define SNAPVM_ERR_UNKNOWN 2
/* The host function failed; the result is its error message. */
#define SNAPVM_ERR_FAILED 3
/* snapvm_host_result: no result is pending. */
#define SNAPVM_ERR_NO_RESULT 4
/* The region or disk access is out of range. */
#define SNAPVM_ERR_OUT_OF_RANGE 5
/* The VM's limit on preserved bytes or regions would be exceeded. */
#define SNAPVM_ERR_TOO_LARGE 6
/* No scratch disk is attached. */
#define SNAPVM_ERR_NO_DISK 7
/* An argument is invalid (a NULL name, a name that is not UTF-8). */
#define SNAPVM_ERR_INVALID 8
/* The host answered with a status this runtime does not know. */
#define SNAPVM_ERR_PROTOCOL 9
/* The guest heap has no room for the result. */
#define SNAPVM_ERR_NO_MEMORY 10

/* Log levels (the host's log::Level). */
#define SNAPVM_LOG_ERROR 1
#define SNAPVM_LOG_WARN 2
#define SNAPVM_LOG_INFO 3
#define SNAPVM_LOG_DEBUG 4
#define SNAPVM_LOG_TRACE 5

/* Alignment of blocks from snapvm_alloc, snapvm_calloc, snapvm_realloc. */
#define SNAPVM_ALLOC_ALIGN 16
/* Longest export name in bytes. */
#define SNAPVM_MAX_NAME 256

/* ---- What the guest defines --------------------------------------- */

/* Runs once at boot; export functions here. When it returns the VM is
 * ready, and a snapshot captures exactly this state. */
void snapvm_init(void);

/* ---- Exports -------------------------------------------------------- */

/* An exported function: `len` input bytes at `input`, valid during the call
 * only (when len is 0, do not read through `input`). Its output is what it
 * appends with snapvm_output / snapvm_output_reserve. */
typedef void (*snapvm_fn)(const uint8_t *input, size_t len);

/* Exports `f` under `name`. Only from snapvm_init; at most 4096 functions.
 * Panics on a NULL, empty, non-UTF-8, duplicate or longer-than-256-byte
 * name, or a NULL function, so the VM fails to boot with GuestPanic. The
 * name is copied. */
void snapvm_export(const char *name, snapvm_fn f);

/* Appends `len` bytes to the running export's output. `data` may point into
 * the output itself (bytes from snapvm_output_reserve). */
void snapvm_output(const void *data, size_t len);

/* Appends `len` zero bytes to the running export's output and returns a
 * pointer to them, to fill in place. Valid until the next snapvm_output*
 * call or the export's return. */
uint8_t *snapvm_output_reserve(size_t len);

/* ---- Host calls ----------------------------------------------------- */

/* Calls host function `name` (VmConfig::host_function) with `input_len`
 * bytes. The result goes to `out` (capacity `out_cap`), its length to
 * *out_len (which may be NULL). Returns:
 *   SNAPVM_OK           the result is in `out`;
 *   SNAPVM_ERR_FAILED   the host function failed, its message is in `out`;
 *   SNAPVM_ERR_TOO_SMALL *out_len is the size needed: fetch the result with
 *                       snapvm_host_result before the next host call;
 *   SNAPVM_ERR_UNKNOWN, SNAPVM_ERR_INVALID (NULL name), SNAPVM_ERR_PROTOCOL.
 * One VM exit. */
int32_t snapvm_host_call(const char *name, const void *input, size_t input_len, void *out,
                         size_t out_cap, size_t *out_len);

/* Fetches the result the last host call could not fit. Returns the host
 * function's status (SNAPVM_OK or SNAPVM_ERR_FAILED), SNAPVM_ERR_TOO_SMALL
 * again (with the size in *out_len) or SNAPVM_ERR_NO_RESULT. */
int32_t snapvm_host_result(void *out, size_t out_cap, size_t *out_len);

/* Like snapvm_host_call, but the result of any size goes to a new block in
 * *out (free it with snapvm_free; NULL when there is none). Also returns
 * SNAPVM_ERR_NO_MEMORY when the heap has no room for it. */
int32_t snapvm_host_call_alloc(const char *name, const void *input, size_t input_len,
                               uint8_t **out, size_t *out_len);

/* ---- Logging and failing -------------------------------------------- */

/* Sends a message to the host's logger (target "snapvm::guest"). Invalid
 * UTF-8 is replaced. One VM exit. */
void snapvm_log(int32_t level, const char *message, size_t len);

/* Stops the guest: the host gets VmError::GuestAbort with the message and
 * the VM is poisoned. */
SNAPVM_NORETURN void snapvm_abort(const char *message, size_t len);

/* Stops the guest as a panic at file:line: the host gets
 * VmError::GuestPanic with the message and location; the VM is poisoned. */
SNAPVM_NORETURN void snapvm_panic(const char *message, size_t len, const char *file,
                                  uint32_t line);

/* Conveniences for NUL-terminated messages. */
#define SNAPVM_LOG(level, str) snapvm_log((level), (str), __builtin_strlen(str))
#define SNAPVM_ABORT(str) snapvm_abort((str), __builtin_strlen(str))
#define SNAPVM_PANIC(str) snapvm_panic((str), __builtin_strlen(str), __FILE__, __LINE__)

/* ---- Snapshots and resets ------------------------------------------- */

/* Keeps `len` bytes at `addr` (in the program image or heap) across resets.
 * Returns SNAPVM_OK, SNAPVM_ERR_OUT_OF_RANGE, SNAPVM_ERR_TOO_LARGE or
 * SNAPVM_ERR_PROTOCOL. One VM exit. */
int32_t snapvm_preserve(const void *addr, size_t len);

/* Random bytes: ChaCha20 seeded with host entropy, reseeded on every restore
 * and reset, so copies of one snapshot never share random output. */
void snapvm_random_bytes(void *buf, size_t len);
uint64_t snapvm_random_u64(void);

/* The generation of this VM lifetime: new at boot, restore and reset. */
uint64_t snapvm_generation(void);

/* Runs `hook` after every restore or reset, before the next export. Hooks
 * registered from C run in registration order. */
void snapvm_on_restore(void (*hook)(void));

/* ---- Heap ------------------------------------------------------------ */

/* malloc, calloc, realloc and free over the guest heap; blocks are
 * SNAPVM_ALLOC_ALIGN-aligned; NULL when the heap has no room.
 * snapvm_realloc(p, 0) frees p and returns NULL. */
void *snapvm_alloc(size_t size);
void *snapvm_calloc(size_t count, size_t size);
void *snapvm_realloc(void *block, size_t size);
void snapvm_free(void *block);

/* Bytes currently allocated on the guest heap. */
size_t snapvm_heap_used(void);

/* Reports the guest's own garbage measure for restore policies. */
void snapvm_report_garbage(uint64_t bytes);

/* ---- Scratch disk (VmConfig::scratch_disk) --------------------------- */

/* Size in bytes; 0 without a disk. */
uint64_t snapvm_disk_size(void);
/* Return SNAPVM_OK, SNAPVM_ERR_NO_DISK or SNAPVM_ERR_OUT_OF_RANGE. */
int32_t snapvm_disk_read(uint64_t offset, void *buf, size_t len);
int32_t snapvm_disk_write(uint64_t offset, const void *data, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* SNAPVM_GUEST_H */
