// mos's C interface to libtorch's c10d (TCPStore, ProcessGroupGloo, ProcessGroupNCCL).
// Every function catches all C++ exceptions: on failure it returns NULL or -1 and sets
// *err to a malloc'ed message (free it with mos_dist_free_string).
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

void mos_dist_free_string(char* s);

void* mos_store_new(const char* host, int port, int is_server, int num_workers,
                    int64_t timeout_ms, char** err);
int64_t mos_store_add(void* store, const char* key, int64_t delta, char** err);
// Sets `key` to `len` bytes of `data`.
int mos_store_set(void* store, const char* key, const uint8_t* data, int64_t len, char** err);
// The bytes of `key` (waiting for it up to the store's timeout) in *out, malloc'ed
// (free with mos_dist_free_string); returns their length, -1 on failure.
int64_t mos_store_get(void* store, const char* key, uint8_t** out, char** err);
int mos_store_delete(void* store, const char* key, char** err);
void mos_store_free(void* store);

void* mos_pg_new_gloo(void* store, int rank, int size, int64_t timeout_ms, char** err);
// NULL with an error when mos was built without NCCL headers.
void* mos_pg_new_nccl(void* store, int rank, int size, int device, int64_t timeout_ms,
                      char** err);
int mos_pg_allreduce_sum(void* pg, void* tensor, char** err);
int mos_pg_broadcast(void* pg, void* tensor, int root, char** err);
int mos_pg_barrier(void* pg, char** err);
void mos_pg_free(void* pg);

#ifdef __cplusplus
}
#endif
