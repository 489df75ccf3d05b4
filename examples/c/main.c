/* Runs a model exported by `cnnc compile MODEL --target llvm -o DIR` without Python.
 *
 * Build (from DIR, for a model named lenet):
 *   cc -O2 -DCNNC_MODEL_HEADER='"lenet.h"' -I. path/to/examples/c/main.c ./lenet.so -o run_lenet
 *
 * The input is a deterministic pattern, input[i] = sin(0.01 * i), so that the Python API can
 * be checked against it; every output value is printed, one per line, with 9 digits. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include CNNC_MODEL_HEADER

int main(int argc, char **argv) {
    long batch = argc > 1 ? strtol(argv[1], NULL, 10) : 2;
    if (batch < 1) {
        fprintf(stderr, "usage: %s [batch >= 1]\n", argv[0]);
        return 2;
    }
    float *input = malloc(sizeof(float) * batch * CNNC_INPUT_SIZE);
    float *output = malloc(sizeof(float) * batch * CNNC_OUTPUT_SIZE);
    if (!input || !output) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (long i = 0; i < batch * CNNC_INPUT_SIZE; i++) {
        input[i] = (float)sin(0.01 * (double)i);
    }
    if (CNNC_FORWARD(input, output, batch) != 0) {
        fprintf(stderr, "%s_forward failed\n", CNNC_MODEL_NAME);
        return 1;
    }
    for (long i = 0; i < batch * CNNC_OUTPUT_SIZE; i++) {
        printf("%.9g\n", output[i]);
    }
    free(input);
    free(output);
    return 0;
}
