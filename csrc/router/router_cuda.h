// Host launchers of the router CUDA kernels (router_cuda.cu). Raw pointers to contiguous device
// memory; "acc" means the accumulation dtype: float64 when the logits are float64, else float32.
// Every launcher returns the first CUDA error it meets (cudaSuccess otherwise), enqueues its work on
// `stream` and never synchronises.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/types.h"

namespace moestream {

struct RouterTopkParams {
  const void* logits = nullptr;  // [tokens, experts], dtype
  FloatKind dtype = FloatKind::kFloat32;
  int64_t tokens = 0;
  int64_t experts = 0;  // 1 .. 2^31 - 1
  int64_t k = 0;        // 1 .. experts
  bool sigmoid = false;  // score == "sigmoid" (else softmax)
  bool topk_first = false;
  const void* bias = nullptr;  // [experts] acc, or nullptr
  int64_t num_groups = 1;      // divides experts
  int64_t topk_groups = 1;     // 1 .. num_groups
  bool normalize = false;
  double scale = 1.0;
  void* weights = nullptr;          // out [tokens, k] acc
  int64_t* ids = nullptr;           // out [tokens, k]
  void* group_workspace = nullptr;  // [router_topk_group_workspace_elems()] acc, when that is > 0
};

// Elements (acc dtype) of scratch the large-expert-count path needs for group scores; 0 when none.
int64_t router_topk_group_workspace_elems(int64_t tokens, int64_t experts, int64_t num_groups);
cudaError_t router_topk_launch(const RouterTopkParams& p, cudaStream_t stream);

struct RouterTopkBackwardParams {
  const void* grad_weights = nullptr;  // [tokens, k] acc
  const void* logits = nullptr;        // [tokens, experts], dtype
  FloatKind dtype = FloatKind::kFloat32;
  const int64_t* ids = nullptr;  // [tokens, k]; entries outside [0, experts) contribute nothing
  int64_t tokens = 0;
  int64_t experts = 0;
  int64_t k = 0;
  bool sigmoid = false;
  bool topk_first = false;
  bool normalize = false;
  double scale = 1.0;
  void* grad_logits = nullptr;  // out [tokens, experts], dtype
};
cudaError_t router_topk_backward_launch(const RouterTopkBackwardParams& p, cudaStream_t stream);

// Load-balancing loss. ids [tokens, k] (entries outside [0, experts) are not counted),
// mask [tokens] acc or nullptr, out: acc scalar. Workspace: router_aux_loss_workspace_elems() acc.
int64_t router_aux_loss_workspace_elems(int64_t tokens, int64_t experts);
cudaError_t router_aux_loss_launch(const void* logits, FloatKind dtype, int64_t tokens, int64_t experts,
                                   const int64_t* ids, int64_t k, const void* mask, void* out, void* workspace,
                                   cudaStream_t stream);
// grad: acc scalar (device); grad_logits: out [tokens, experts] dtype.
cudaError_t router_aux_loss_backward_launch(const void* grad, const void* logits, FloatKind dtype, int64_t tokens,
                                            int64_t experts, const int64_t* ids, int64_t k, const void* mask,
                                            void* grad_logits, void* workspace, cudaStream_t stream);

// z-loss: out acc scalar; workspace router_z_loss_workspace_elems() acc.
int64_t router_z_loss_workspace_elems(int64_t tokens);
cudaError_t router_z_loss_launch(const void* logits, FloatKind dtype, int64_t tokens, int64_t experts, void* out,
                                 void* workspace, cudaStream_t stream);
cudaError_t router_z_loss_backward_launch(const void* grad, const void* logits, FloatKind dtype, int64_t tokens,
                                          int64_t experts, void* grad_logits, cudaStream_t stream);

}  // namespace moestream
