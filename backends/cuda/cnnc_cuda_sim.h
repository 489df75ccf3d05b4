// cnnc_cuda_sim.h: the CUDA built-ins that cnnc's generated kernels use, for the host C++
// compiler, so that target "cuda-sim" runs the very source the GPU would run.
//
// A launch runs every block in turn. In a kernel without barriers each thread is a plain call;
// in one with barriers every thread of a block is a fiber (ucontext), and __syncthreads()
// switches to the next thread until all of them have arrived. A barrier that some threads of
// a block never reach, or threads waiting at different barriers, is reported as an error.
// Code generated with check_bounds reaches every buffer through cnnc_at() (defined below): an
// index out of bounds is recorded, with the kernel, buffer and thread, and the access is sent
// to a scratch float instead; the launch then fails with status 2 and that report.
// It is for testing and debugging: nothing here is fast, and nothing runs on a GPU.
#ifndef CNNC_CUDA_SIM_H
#define CNNC_CUDA_SIM_H

#define CNNC_CUDA_SIM 1

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
};

namespace cnnc_sim {

enum FiberState { RUNNING, AT_BARRIER, FINISHED };

struct Fiber {
    ucontext_t context;
    FiberState state;
    int barrier_line;
    uint3 index;
};

typedef void (*Body)(void **args);

// What the running thread sees; thread-local, so launches on several host threads are apart.
struct State {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
    Fiber *current;  // the fiber running now, or null outside cooperative blocks
    ucontext_t scheduler;
    Body body;
    void **args;
    int misuse_line;  // a barrier met where no fiber runs: the kernel was marked barrier-free
    bool out_of_bounds;  // a checked access missed its buffer; `bounds_report` says which
    char bounds_report[512];
};

inline thread_local State state;

// Where a checked access out of bounds goes instead: never inside any buffer.
inline thread_local float scratch;

inline void fiber_entry()
{
    state.body(state.args);
    state.current->state = FINISHED;
    // Returning resumes the scheduler through uc_link.
}

inline void syncthreads(int line)
{
    Fiber *fiber = state.current;
    if (fiber == nullptr) {
        if (state.block_dim.x * state.block_dim.y * state.block_dim.z > 1 &&
            state.misuse_line == 0)
            state.misuse_line = line;
        return;
    }
    fiber->state = AT_BARRIER;
    fiber->barrier_line = line;
    swapcontext(&fiber->context, &state.scheduler);
}

inline uint3 unflatten(unsigned int flat, dim3 dims)
{
    uint3 index = {flat % dims.x, flat / dims.x % dims.y, flat / (dims.x * dims.y)};
    return index;
}

// Runs the threads of the current block as fibers, round by round, each round up to the
// next barrier. Returns 0, or 1 with `error` filled when the threads disagree on a barrier.
inline int run_cooperative_block(Fiber *fibers, char *stacks, size_t stack_size,
                                 unsigned int threads, char *error, int error_size)
{
    for (unsigned int t = 0; t < threads; ++t) {
        Fiber &fiber = fibers[t];
        getcontext(&fiber.context);
        fiber.context.uc_stack.ss_sp = stacks + (size_t)t * stack_size;
        fiber.context.uc_stack.ss_size = stack_size;
        fiber.context.uc_link = &state.scheduler;
        makecontext(&fiber.context, fiber_entry, 0);
        fiber.state = RUNNING;
        fiber.barrier_line = 0;
        fiber.index = unflatten(t, state.block_dim);
    }
    for (;;) {
        for (unsigned int t = 0; t < threads; ++t) {
            Fiber &fiber = fibers[t];
            if (fiber.state != RUNNING)
                continue;
            state.current = &fiber;
            state.thread_idx = fiber.index;
            swapcontext(&state.scheduler, &fiber.context);
        }
        state.current = nullptr;
        unsigned int waiting = 0, finished = 0;
        int first_waiting = -1, first_finished = -1;
        for (unsigned int t = 0; t < threads; ++t) {
            if (fibers[t].state == AT_BARRIER) {
                if (first_waiting < 0)
                    first_waiting = (int)t;
                ++waiting;
            } else {
                if (first_finished < 0)
                    first_finished = (int)t;
                ++finished;
            }
        }
        if (waiting == 0)
            return 0;
        const uint3 &b = state.block_idx;
        if (finished > 0) {
            const Fiber &w = fibers[first_waiting], &f = fibers[first_finished];
            snprintf(error, (size_t)error_size,
                     "block (%u,%u,%u): %u of %u threads wait at the __syncthreads() on line %d "
                     "of the source (e.g. thread (%u,%u,%u)) but %u finished without reaching it "
                     "(e.g. thread (%u,%u,%u)); every thread of a block must reach each barrier",
                     b.x, b.y, b.z, waiting, threads, w.barrier_line, w.index.x, w.index.y,
                     w.index.z, finished, f.index.x, f.index.y, f.index.z);
            return 1;
        }
        for (unsigned int t = 1; t < threads; ++t) {
            if (fibers[t].barrier_line != fibers[0].barrier_line) {
                snprintf(error, (size_t)error_size,
                         "block (%u,%u,%u): threads wait at different barriers: thread "
                         "(%u,%u,%u) at the __syncthreads() on line %d, thread (%u,%u,%u) at "
                         "the one on line %d",
                         b.x, b.y, b.z, fibers[0].index.x, fibers[0].index.y,
                         fibers[0].index.z, fibers[0].barrier_line, fibers[t].index.x,
                         fibers[t].index.y, fibers[t].index.z, fibers[t].barrier_line);
                return 1;
            }
        }
        for (unsigned int t = 0; t < threads; ++t)
            fibers[t].state = RUNNING;
    }
}

// Runs `body` on a grid of blocks; `cooperative` kernels (those with barriers) run each
// block's threads as fibers. Returns 0, or 1 with a message in `error`.
inline int launch(Body body, void **args, dim3 grid, dim3 block, bool cooperative,
                  char *error, int error_size)
{
    const unsigned int threads = block.x * block.y * block.z;
    const size_t blocks = (size_t)grid.x * grid.y * grid.z;
    if (threads == 0 || threads > 1024) {
        snprintf(error, (size_t)error_size, "a block of %u threads; CUDA allows 1 to 1024",
                 threads);
        return 1;
    }
    state.body = body;
    state.args = args;
    state.block_dim = block;
    state.grid_dim = grid;
    state.current = nullptr;
    state.misuse_line = 0;
    state.out_of_bounds = false;
    const size_t stack_size = 64 * 1024;
    Fiber *fibers = nullptr;
    char *stacks = nullptr;
    if (cooperative) {
        fibers = (Fiber *)calloc(threads, sizeof(Fiber));
        stacks = (char *)malloc(threads * stack_size);
        if (fibers == nullptr || stacks == nullptr) {
            free(fibers);
            free(stacks);
            snprintf(error, (size_t)error_size, "out of memory for %u fiber stacks", threads);
            return 1;
        }
    }
    const dim3 grid_dims = grid;
    int status = 0;
    for (size_t flat = 0; flat < blocks && status == 0 && !state.out_of_bounds; ++flat) {
        state.block_idx.x = (unsigned int)(flat % grid_dims.x);
        state.block_idx.y = (unsigned int)(flat / grid_dims.x % grid_dims.y);
        state.block_idx.z = (unsigned int)(flat / ((size_t)grid_dims.x * grid_dims.y));
        if (cooperative) {
            status = run_cooperative_block(fibers, stacks, stack_size, threads, error,
                                           error_size);
        } else {
            for (unsigned int t = 0; t < threads; ++t) {
                state.thread_idx = unflatten(t, block);
                body(args);
            }
        }
    }
    free(fibers);
    free(stacks);
    if (state.out_of_bounds) {
        snprintf(error, (size_t)error_size, "%s", state.bounds_report);
        return 2;
    }
    if (status == 0 && state.misuse_line != 0) {
        snprintf(error, (size_t)error_size,
                 "the kernel calls __syncthreads() (line %d) but was launched as one without "
                 "barriers", state.misuse_line);
        status = 1;
    }
    return status;
}

}  // namespace cnnc_sim

// The checked access of code generated with check_bounds: `base + index` when 0 <= index <
// size, else the first such access of the launch is reported and the scratch float is used.
template <typename T>
inline T *cnnc_at(T *base, long long index, long long size, const char *kernel,
                  const char *buffer, int line)
{
    if (index >= 0 && index < size)
        return base + index;
    cnnc_sim::State &s = cnnc_sim::state;
    if (!s.out_of_bounds) {
        s.out_of_bounds = true;
        snprintf(s.bounds_report, sizeof s.bounds_report,
                 "kernel %s accessed %s[%lld], out of bounds of its %lld floats (line %d of "
                 "the source), in block (%u,%u,%u), thread (%u,%u,%u)",
                 kernel, buffer, index, size, line, s.block_idx.x, s.block_idx.y,
                 s.block_idx.z, s.thread_idx.x, s.thread_idx.y, s.thread_idx.z);
    }
    cnnc_sim::scratch = 0.0f;
    return (T *)&cnnc_sim::scratch;
}

#define threadIdx (cnnc_sim::state.thread_idx)
#define blockIdx (cnnc_sim::state.block_idx)
#define blockDim (cnnc_sim::state.block_dim)
#define gridDim (cnnc_sim::state.grid_dim)
#define __syncthreads() cnnc_sim::syncthreads(__LINE__)

#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One array for all the fibers of a block, which run on one host thread.
#define __shared__ static thread_local

inline float __int_as_float(int bits)
{
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

inline float __expf(float x)
{
    return expf(x);
}

template <typename T>
inline T __ldg(const T *address)
{
    return *address;
}

#endif  // CNNC_CUDA_SIM_H
