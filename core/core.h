// moemesh core: what every role builds on.
//
//   config.h      config.json -> ModelConfig (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2,
//                 deepseek_v3 / kimi_k2, glm4_moe, dbrx)
//   checkpoint.h  memory-mapped safetensors checkpoints (single file or sharded; F32/F16/BF16)
//   model.h       Model: weights checked against the config, the forward pass over a paged KV
//                 cache (CPU or GPU), and the ExpertBackend seam through which routed experts
//                 are computed
//   kv_blocks.h   KvBlockManager: block reference counts, prefix caching, LRU eviction
//   expert_shard.h  ExpertShard: a chosen set of routed experts of a checkpoint (an expert worker)
//   tokenizer.h   Hugging Face tokenizer.json: encode/decode as `tokenizers` does, DecodeStream
//   chat_template.h  Jinja chat templates rendered as transformers' apply_chat_template does
//   sampling.h    SamplingParams and Sampler: the OpenAI/vLLM sampling parameters
//   generate.h    offline prefill + decode for one sequence
//   npy.h         float32 .npy files (logit dumps, test fixtures)
//   plan.h        the memory and parallelism planner of `moemesh plan` (any supported config.json)
//   cpus.h        CPU lists (`--cpus`) and their split among role processes sharing a machine
//
// Every fallible call returns Expected<T> or Status (error.h); messages name the file, tensor,
// field or flag that is wrong and say what was expected. Nothing in core throws across its API
// or aborts on bad input.
#pragma once

#include "core/chat_template.h"
#include "core/checkpoint.h"
#include "core/config.h"
#include "core/cpus.h"
#include "core/error.h"
#include "core/expert_shard.h"
#include "core/generate.h"
#include "core/kv_blocks.h"
#include "core/model.h"
#include "core/npy.h"
#include "core/plan.h"
#include "core/sampling.h"
#include "core/tokenizer.h"
