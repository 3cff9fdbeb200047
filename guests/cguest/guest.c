/*
 * A snapvm guest written in C: no C library, only snapvm_guest.h and
 * libsnapvm_guest_c.a. Used by tests/c_guest.rs and shown in
 * docs/guest-guide.md.
 */
#include <snapvm_guest.h>

/* Counts calls; preserved, so it keeps counting across resets. */
static uint64_t preserved_calls;
/* Counts calls; returns to its ready-state value on every reset. */
static uint64_t plain_calls;
/* Counts restore hook runs since the ready state. */
static uint64_t hook_runs;

static void out_u64(uint64_t value) {
    snapvm_output(&value, sizeof value);
}

/* Returns the input in upper case (ASCII), written in place. */
static void upper(const uint8_t *input, size_t len) {
    uint8_t *out = snapvm_output_reserve(len);
    for (size_t i = 0; i < len; i++) {
        uint8_t c = input[i];
        out[i] = (c >= 'a' && c <= 'z') ? (uint8_t)(c - 'a' + 'A') : c;
    }
}

/* Returns the input twice: the second copy comes from the output itself. */
static void twice(const uint8_t *input, size_t len) {
    uint8_t *first = snapvm_output_reserve(len);
    for (size_t i = 0; i < len; i++) {
        first[i] = input[i];
    }
    snapvm_output(first, len);
}

/* Returns the input reversed, built in a heap buffer. */
static void reverse(const uint8_t *input, size_t len) {
    uint8_t *buf = snapvm_alloc(len);
    if (buf == NULL && len != 0) {
        SNAPVM_ABORT("out of memory");
    }
    for (size_t i = 0; i < len; i++) {
        buf[i] = input[len - 1 - i];
    }
    snapvm_output(buf, len);
    snapvm_free(buf);
}

/* "<greeting from the host>, <input>!" */
static void greet(const uint8_t *input, size_t len) {
    uint8_t word[64];
    size_t word_len = 0;
    int32_t status = snapvm_host_call("greeting", NULL, 0, word, sizeof word, &word_len);
    if (status != SNAPVM_OK) {
        SNAPVM_ABORT("the host has no greeting");
    }
    snapvm_output(word, word_len);
    snapvm_output(", ", 2);
    snapvm_output(input, len);
    snapvm_output("!", 1);
}

/* Calls host function "repeat" with the input into an 8-byte buffer; a
 * longer result is fetched with snapvm_host_result. Output: the status of
 * the first call (one byte), then the result. */
static void host_big(const uint8_t *input, size_t len) {
    uint8_t small[8];
    size_t need = 0;
    int32_t first = snapvm_host_call("repeat", input, len, small, sizeof small, &need);
    uint8_t status_byte = (uint8_t)first;
    snapvm_output(&status_byte, 1);
    if (first == SNAPVM_OK) {
        snapvm_output(small, need);
        return;
    }
    if (first != SNAPVM_ERR_TOO_SMALL) {
        return;
    }
    uint8_t *big = snapvm_output_reserve(need);
    size_t got = 0;
    if (snapvm_host_result(big, need, &got) != SNAPVM_OK || got != need) {
        SNAPVM_ABORT("snapvm_host_result failed");
    }
}

/* Calls the host function named by the input with snapvm_host_call_alloc.
 * Output: the status (one byte), then the result or error message. */
static void host_any(const uint8_t *input, size_t len) {
    char name[SNAPVM_MAX_NAME + 1];
    if (len > SNAPVM_MAX_NAME) {
        SNAPVM_ABORT("name too long");
    }
    for (size_t i = 0; i < len; i++) {
        name[i] = (char)input[i];
    }
    name[len] = '\0';
    uint8_t *result = NULL;
    size_t result_len = 0;
    int32_t status = snapvm_host_call_alloc(name, "abc", 3, &result, &result_len);
    uint8_t status_byte = (uint8_t)status;
    snapvm_output(&status_byte, 1);
    snapvm_output(result, result_len);
    snapvm_free(result);
}

/* Logs the input at info level and returns nothing. */
static void log_input(const uint8_t *input, size_t len) {
    snapvm_log(SNAPVM_LOG_INFO, (const char *)input, len);
}

static void fail_panic(const uint8_t *input, size_t len) {
    (void)input;
    (void)len;
    SNAPVM_PANIC("the C guest panics on request");
}

static void fail_abort(const uint8_t *input, size_t len) {
    snapvm_abort((const char *)input, len);
}

/* 32 random bytes. */
static void random32(const uint8_t *input, size_t len) {
    (void)input;
    (void)len;
    snapvm_random_bytes(snapvm_output_reserve(32), 32);
}

/* The generation, then the number of restore hook runs. */
static void lifetime(const uint8_t *input, size_t len) {
    (void)input;
    (void)len;
    out_u64(snapvm_generation());
    out_u64(hook_runs);
}

/* Bumps both counters and returns them: preserved, plain. */
static void counters(const uint8_t *input, size_t len) {
    (void)input;
    (void)len;
    out_u64(++preserved_calls);
    out_u64(++plain_calls);
}

/* Exercises the heap functions; returns "ok" and the bytes still in use. */
static void heap(const uint8_t *input, size_t len) {
    (void)input;
    (void)len;
    size_t before = snapvm_heap_used();
    uint32_t *numbers = snapvm_calloc(1000, sizeof *numbers);
    if (numbers == NULL || ((uintptr_t)numbers % SNAPVM_ALLOC_ALIGN) != 0) {
        SNAPVM_ABORT("calloc failed");
    }
    for (uint32_t i = 0; i < 1000; i++) {
        if (numbers[i] != 0) {
            SNAPVM_ABORT("calloc did not zero");
        }
        numbers[i] = i;
    }
    numbers = snapvm_realloc(numbers, 100000 * sizeof *numbers);
    if (numbers == NULL || numbers[999] != 999) {
        SNAPVM_ABORT("realloc lost data");
    }
    snapvm_free(numbers);
    snapvm_free(NULL);
    if (snapvm_realloc(snapvm_alloc(8), 0) != NULL) {
        SNAPVM_ABORT("realloc to 0 must free");
    }
    if (snapvm_alloc((size_t)-1) != NULL || snapvm_calloc((size_t)-1, 2) != NULL) {
        SNAPVM_ABORT("impossible sizes must fail");
    }
    uint64_t leaked = snapvm_heap_used() - before;
    snapvm_output("ok", 2);
    out_u64(leaked);
}

static void on_restore(void) {
    hook_runs++;
}

void snapvm_init(void) {
    if (snapvm_preserve(&preserved_calls, sizeof preserved_calls) != SNAPVM_OK) {
        SNAPVM_PANIC("preserve refused");
    }
    snapvm_on_restore(on_restore);
    snapvm_log(SNAPVM_LOG_INFO, "C guest ready", 13);
    snapvm_export("upper", upper);
    snapvm_export("twice", twice);
    snapvm_export("reverse", reverse);
    snapvm_export("greet", greet);
    snapvm_export("host_big", host_big);
    snapvm_export("host_any", host_any);
    snapvm_export("log", log_input);
    snapvm_export("panic", fail_panic);
    snapvm_export("abort", fail_abort);
    snapvm_export("random", random32);
    snapvm_export("lifetime", lifetime);
    snapvm_export("counters", counters);
    snapvm_export("heap", heap);
}
