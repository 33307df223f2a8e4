#include "moqe/dist/expert_parallel.hpp"

#include <algorithm>
#include <cstring>
#include <exception>

#include "../moe/layer_tail.hpp"
#include "moqe/core/error.hpp"
#include "moqe/core/threading.hpp"

namespace moqe {

// ---- placement ----

ExpertPlacement ExpertPlacement::contiguous(int64_t num_experts, int ranks) {
  MOQE_CHECK(num_experts > 0 && ranks > 0,
             "ExpertPlacement: {} experts over {} ranks (both must be positive)", num_experts,
             ranks);
  std::vector<int32_t> owner(static_cast<size_t>(num_experts));
  const int64_t base = num_experts / ranks, extra = num_experts % ranks;
  int64_t e = 0;
  for (int r = 0; r < ranks; ++r) {
    const int64_t n = base + (r < extra ? 1 : 0);
    for (int64_t i = 0; i < n; ++i) owner[static_cast<size_t>(e++)] = r;
  }
  return from_owners(std::move(owner), ranks);
}

ExpertPlacement ExpertPlacement::from_owners(std::vector<int32_t> owner, int ranks) {
  MOQE_CHECK(ranks > 0 && !owner.empty(),
             "ExpertPlacement: {} experts over {} ranks (both must be positive)", owner.size(),
             ranks);
  ExpertPlacement p;
  p.ranks_ = ranks;
  p.rank_start_.assign(static_cast<size_t>(ranks + 1), 0);
  for (size_t e = 0; e < owner.size(); ++e) {
    MOQE_CHECK(owner[e] >= 0 && owner[e] < ranks,
               "ExpertPlacement: expert {} is placed on rank {}, not one of the {} ranks", e,
               owner[e], ranks);
    p.rank_start_[static_cast<size_t>(owner[e]) + 1]++;
  }
  for (int r = 0; r < ranks; ++r) {
    p.max_local_ = std::max(p.max_local_, p.rank_start_[r + 1]);
    p.rank_start_[r + 1] += p.rank_start_[r];
  }
  p.order_.resize(owner.size());
  std::vector<int64_t> cursor(p.rank_start_.begin(), p.rank_start_.end() - 1);
  for (size_t e = 0; e < owner.size(); ++e) {
    p.order_[static_cast<size_t>(cursor[owner[e]]++)] = static_cast<int64_t>(e);
  }
  p.owner_ = std::move(owner);
  return p;
}

std::span<const int64_t> ExpertPlacement::experts_of(int rank) const {
  MOQE_CHECK(rank >= 0 && rank < ranks_, "ExpertPlacement: rank {} of {}", rank, ranks_);
  return {order_.data() + rank_start_[rank],
          static_cast<size_t>(rank_start_[rank + 1] - rank_start_[rank])};
}

// ---- layer ----

namespace {

// A fingerprint of what every rank must agree on, compared across ranks once at construction so
// that a mismatch is an error on every rank instead of a hang or wrong rows later.
std::vector<int64_t> layout_fingerprint(const ExpertPlacement& p, int64_t hidden,
                                        const Router& router) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the owners
  for (int64_t e = 0; e < p.num_experts(); ++e) {
    h = (h ^ static_cast<uint64_t>(p.owner(e))) * 1099511628211ull;
  }
  return {static_cast<int64_t>(h & 0x7fffffffffffffffull), p.num_experts(), hidden,
          static_cast<int64_t>(router.kind()), router.slots_per_token()};
}

}  // namespace

ExpertParallelMoELayer::ExpertParallelMoELayer(
    std::shared_ptr<Communicator> comm, ExpertPlacement placement, Router router,
    std::vector<std::shared_ptr<const ExpertMLP>> local_experts, int64_t hidden,
    std::vector<SharedExpert> shared, std::optional<ResidualMLP> residual,
    std::vector<float> output_bias)
    : comm_(std::move(comm)),
      placement_(std::move(placement)),
      router_(std::move(router)),
      shared_(std::move(shared)),
      residual_(std::move(residual)),
      output_bias_(std::move(output_bias)),
      hidden_(hidden) {
  MOQE_CHECK(comm_ != nullptr, "ExpertParallelMoELayer: no communicator");
  MOQE_CHECK(output_bias_.empty() || static_cast<int64_t>(output_bias_.size()) == hidden_,
             "ExpertParallelMoELayer: the output bias has {} values, expected {}",
             output_bias_.size(), hidden_);
  MOQE_CHECK(comm_->size() == placement_.ranks(),
             "ExpertParallelMoELayer: the placement is for {} ranks, the {} communicator has {}",
             placement_.ranks(), comm_->backend(), comm_->size());
  MOQE_CHECK(router_.num_experts() == placement_.num_experts(),
             "ExpertParallelMoELayer: the router has {} experts, the placement {}",
             router_.num_experts(), placement_.num_experts());
  if (router_.kind() != RouterKind::kTask) {
    MOQE_CHECK(router_.hidden() == hidden_,
               "ExpertParallelMoELayer: the router's hidden size {} is not {}", router_.hidden(),
               hidden_);
  }
  const auto mine = placement_.experts_of(comm_->rank());
  MOQE_CHECK(local_experts.size() == mine.size(),
             "ExpertParallelMoELayer: rank {} holds {} experts in the placement, {} were given",
             comm_->rank(), mine.size(), local_experts.size());
  experts_ = ExpertGroup(std::move(local_experts), hidden_);
  max_dense_intermediate_ =
      detail::check_layer_tail(shared_, residual_, hidden_, "ExpertParallelMoELayer");
  bucket_.resize(static_cast<size_t>(placement_.num_experts()));
  int32_t b = 0;
  for (int r = 0; r < placement_.ranks(); ++r) {
    for (const int64_t e : placement_.experts_of(r)) bucket_[static_cast<size_t>(e)] = b++;
  }
  // Every rank must hold the same placement and layer shape.
  const std::vector<int64_t> mine_fp = layout_fingerprint(placement_, hidden_, router_);
  std::vector<int64_t> all(mine_fp.size() * static_cast<size_t>(comm_->size()));
  comm_->all_gather(mine_fp, all);
  for (int r = 0; r < comm_->size(); ++r) {
    MOQE_CHECK(std::equal(mine_fp.begin(), mine_fp.end(), all.begin() + r * mine_fp.size()),
               "ExpertParallelMoELayer: rank {} has a different placement or layer shape than "
               "rank {} (experts, hidden size, router or owners differ)",
               r, comm_->rank());
  }
}

ExpertParallelMoELayer ExpertParallelMoELayer::from_layer(const MoELayer& layer,
                                                          std::shared_ptr<Communicator> comm,
                                                          ExpertPlacement placement) {
  MOQE_CHECK(comm != nullptr, "ExpertParallelMoELayer::from_layer: no communicator");
  MOQE_CHECK(placement.num_experts() == layer.num_experts(),
             "ExpertParallelMoELayer::from_layer: the placement has {} experts, the layer {}",
             placement.num_experts(), layer.num_experts());
  std::vector<std::shared_ptr<const ExpertMLP>> local;
  for (const int64_t e : placement.experts_of(comm->rank())) local.push_back(layer.experts()[e]);
  return ExpertParallelMoELayer(std::move(comm), std::move(placement), layer.router(),
                                std::move(local), layer.hidden(), layer.shared_experts(),
                                layer.residual(), layer.output_bias());
}

LayerStats ExpertParallelMoELayer::stats() const {
  return detail::layer_stats(experts_, shared_, residual_, router_);
}

ExpertParallelMoELayer::Workspace ExpertParallelMoELayer::make_workspace(int64_t max_tokens) const {
  MOQE_CHECK(max_tokens >= 0, "make_workspace: negative max_tokens {}", max_tokens);
  const int64_t p = comm_->size(), e = num_experts(), l = experts_.size();
  const int64_t slots = router_.slots_per_token(), lmax = placement_.max_local_experts();
  Workspace ws;
  ws.max_tokens = max_tokens;
  ws.routing.reset(max_tokens, slots, e);
  ws.routing.scratch.resize(static_cast<size_t>(max_tokens * e));
  ws.plan.reserve(max_tokens, slots, e);
  const int64_t sent = max_tokens * slots;
  // Each token reaches a given expert at most once, so this rank receives at most
  // min(slots, local experts) rows per token of every rank.
  const int64_t received = p * max_tokens * std::min(slots, l);
  ws.xe.resize(static_cast<size_t>(sent * hidden_));
  ws.ye.resize(ws.xe.size());
  ws.xr.resize(static_cast<size_t>(received * hidden_));
  ws.xl.resize(ws.xr.size());
  ws.yl.resize(ws.xr.size());
  ws.local_row.resize(static_cast<size_t>(received));
  ws.send_counts.resize(static_cast<size_t>(p * lmax));
  ws.recv_counts.resize(ws.send_counts.size());
  ws.send_rows.resize(static_cast<size_t>(p));
  ws.recv_rows.resize(static_cast<size_t>(p));
  ws.local_offsets.resize(static_cast<size_t>(l + 1));
  ws.experts = experts_.make_workspace(received, p * max_tokens);
  detail::reserve_layer_tail(!shared_.empty() || residual_.has_value(), max_tokens, hidden_,
                             max_dense_intermediate_, ws.scratch, ws.extra, ws.active_tokens);
  ws.stats.rows_to.resize(static_cast<size_t>(p));
  ws.stats.rows_from.resize(static_cast<size_t>(p));
  ws.stats.expert_rows.resize(static_cast<size_t>(l));
  ws.x32.resize(static_cast<size_t>(max_tokens * hidden_));
  ws.y32.resize(ws.x32.size());
  return ws;
}

template <HalfActivation T>
void ExpertParallelMoELayer::run(MatrixView<const T> x, MatrixView<T> y, Workspace& ws,
                                 const RunOptions& o) {
  const int64_t h = hidden_;
  const bool fits = x.cols() == h && y.rows() == x.rows() && y.cols() == h &&
                    x.rows() <= ws.max_tokens &&
                    static_cast<int64_t>(ws.x32.size()) >= x.rows() * h;
  if (!fits) {
    // Views of the same shapes, never read: the fp32 step rejects them on every rank together
    // (a rank that threw here alone would leave the others waiting in the exchange).
    run(MatrixView<const float>(ws.x32.data(), x.rows(), x.cols()),
        MatrixView<float>(ws.y32.data(), y.rows(), y.cols()), ws, o);
    MOQE_FAIL("ExpertParallelMoELayer: input {} and output {} do not fit", shape_string(x),
              shape_string(y));
  }
  const MatrixView<float> x32(ws.x32.data(), x.rows(), h), y32(ws.y32.data(), x.rows(), h);
  widen_rows(x, x32);
  run(MatrixView<const float>(x32), y32, ws, o);
  round_rows(MatrixView<const float>(y32), y);
}

template void ExpertParallelMoELayer::run<Half>(MatrixView<const Half>, MatrixView<Half>,
                                                ExpertParallelWorkspace&, const MoeRunOptions&);
template void ExpertParallelMoELayer::run<BFloat16>(MatrixView<const BFloat16>,
                                                    MatrixView<BFloat16>, ExpertParallelWorkspace&,
                                                    const MoeRunOptions&);

void ExpertParallelMoELayer::run(MatrixView<const float> x, MatrixView<float> y, Workspace& ws,
                                 const RunOptions& o) {
  const int64_t t_count = x.rows(), h = hidden_;
  const int threads = o.num_threads;
  const int p_count = comm_->size();
  const int64_t l_count = experts_.size(), lmax = placement_.max_local_experts();
  MOQE_CHECK(static_cast<int64_t>(ws.send_counts.size()) == p_count * lmax &&
                 static_cast<int64_t>(ws.recv_counts.size()) == p_count * lmax,
             "ExpertParallelMoELayer: the workspace was made for another layer");

  // Everything that can fail on this rank alone happens before the first exchange, and a
  // failure is announced through it (every count -1), so that every rank throws instead of
  // the others waiting forever for this one.
  std::exception_ptr local_error;
  int64_t rows = 0;
  const Routing* routing = &ws.routing;
  try {
    MOQE_CHECK(x.cols() == h && y.rows() == t_count && y.cols() == h,
               "ExpertParallelMoELayer (hidden {}): input {} and output {} do not fit", h,
               shape_string(x), shape_string(y));
    MOQE_CHECK(t_count <= ws.max_tokens,
               "ExpertParallelMoELayer: {} tokens exceed the workspace's {}", t_count,
               ws.max_tokens);
    // Route this rank's tokens; group the kept rows by (destination rank, local expert there).
    // (A given routing, MoeRunOptions::routing, in place of the router's.)
    if (o.routing != nullptr) {
      detail::check_given_routing(*o.routing, t_count, router_.num_experts(),
                                  "ExpertParallelMoELayer");
      routing = o.routing;
    } else {
      router_.route(x, ws.routing, {threads, o.active, o.sequence_lengths, o.task_id, o.task_ids});
    }
    ws.plan.build(*routing, bucket_);
    rows = ws.plan.rows();
    gather_rows(ws.plan, x, MatrixView<float>(ws.xe.data(), rows, h), threads, weight_placement());
    int64_t b = 0;
    for (int p = 0; p < p_count; ++p) {
      const auto n_local = static_cast<int64_t>(placement_.experts_of(p).size());
      int64_t total = 0;
      for (int64_t l = 0; l < lmax; ++l) {
        const int64_t n = l < n_local ? ws.plan.expert_rows(b + l) : 0;
        ws.send_counts[static_cast<size_t>(p * lmax + l)] = n;
        total += n;
      }
      b += n_local;
      ws.send_rows[static_cast<size_t>(p)] = total;
    }
  } catch (...) {
    local_error = std::current_exception();
    std::fill(ws.send_counts.begin(), ws.send_counts.end(), int64_t{-1});
  }
  MatrixView<float> ye(ws.ye.data(), rows, h);

  // Exchange the per-expert row counts, then the rows.
  comm_->all_to_all(ws.send_counts, ws.recv_counts);
  if (local_error) std::rethrow_exception(local_error);
  for (int p = 0; p < p_count; ++p) {
    MOQE_CHECK(ws.recv_counts[static_cast<size_t>(p * lmax)] != -1,
               "ExpertParallelMoELayer: rank {} failed in this step before the exchange (its "
               "own error says why); no rows were exchanged",
               p);
  }
  int64_t received = 0;
  ws.local_offsets.assign(static_cast<size_t>(l_count + 1), 0);
  for (int p = 0; p < p_count; ++p) {
    int64_t total = 0;
    for (int64_t l = 0; l < lmax; ++l) {
      const int64_t n = ws.recv_counts[static_cast<size_t>(p * lmax + l)];
      // Placements agree (checked at construction), so no rank sends rows for an expert this
      // rank does not hold.
      MOQE_CHECK(n >= 0 && (n == 0 || l < l_count),
                 "ExpertParallelMoELayer: rank {} sent {} rows for local expert {} of rank {}, "
                 "which holds {}",
                 p, n, l, comm_->rank(), l_count);
      if (l < l_count) ws.local_offsets[static_cast<size_t>(l + 1)] += n;
      total += n;
    }
    ws.recv_rows[static_cast<size_t>(p)] = total;
    received += total;
  }
  for (int64_t l = 0; l < l_count; ++l) ws.local_offsets[l + 1] += ws.local_offsets[l];
  // Ranks may size their workspaces differently; grow instead of failing on one rank only
  // (which would leave the others waiting in the next exchange).
  if (received * h > static_cast<int64_t>(ws.xr.size())) {
    ws.xr.resize(static_cast<size_t>(received * h));
    ws.xl.resize(ws.xr.size());
    ws.yl.resize(ws.xr.size());
    ws.local_row.resize(static_cast<size_t>(received));
  }
  int64_t most = 0;
  for (int64_t l = 0; l < l_count; ++l) {
    most = std::max(most, ws.local_offsets[l + 1] - ws.local_offsets[l]);
  }
  if (received > ws.experts.max_rows || most > ws.experts.max_rows_per_expert) {
    ws.experts = experts_.make_workspace(std::max(received, ws.experts.max_rows),
                                         std::max(most, ws.experts.max_rows_per_expert));
  }
  comm_->all_to_all_rows(ws.xe.data(), ws.send_rows, ws.xr.data(), ws.recv_rows, h);

  // Received rows come as (source rank, local expert); the experts want (local expert, source).
  {
    int64_t pos = 0;
    std::vector<int64_t>& cursor = ws.send_counts;  // reused: [lmax] >= l_count entries
    for (int64_t l = 0; l < l_count; ++l) cursor[static_cast<size_t>(l)] = ws.local_offsets[l];
    for (int p = 0; p < p_count; ++p) {
      for (int64_t l = 0; l < l_count; ++l) {
        const int64_t n = ws.recv_counts[static_cast<size_t>(p * lmax + l)];
        for (int64_t i = 0; i < n; ++i) ws.local_row[static_cast<size_t>(pos + i)] = cursor[l] + i;
        cursor[static_cast<size_t>(l)] += n;
        pos += n;
      }
    }
  }
  const auto row_bytes = sizeof(float) * static_cast<size_t>(h);
  parallel_for(received, threads, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      std::memcpy(ws.xl.data() + ws.local_row[r] * h, ws.xr.data() + r * h, row_bytes);
    }
  });
  experts_.run(ws.local_offsets, MatrixView<const float>(ws.xl.data(), received, h),
               MatrixView<float>(ws.yl.data(), received, h), ws.experts, threads);
  parallel_for(received, threads, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      std::memcpy(ws.xr.data() + r * h, ws.yl.data() + ws.local_row[r] * h, row_bytes);
    }
  });
  // Results go back the way the rows came.
  comm_->all_to_all_rows(ws.xr.data(), ws.recv_rows, ws.ye.data(), ws.send_rows, h);

  combine_rows(ws.plan, MatrixView<const float>(ye), y, threads, weight_placement());
  detail::finish_layer(x, y, *routing, shared_, residual_, output_bias_, o.active,
                       {ws.max_tokens, &ws.scratch, &ws.extra, &ws.active_tokens}, threads);

  // Statistics of the step.
  ExpertParallelStats& s = ws.stats;
  s.tokens = t_count;
  s.routed_rows = rows;
  s.bytes_sent = s.bytes_received = 0;
  const int me = comm_->rank();
  for (int p = 0; p < p_count; ++p) {
    s.rows_to[static_cast<size_t>(p)] = ws.send_rows[static_cast<size_t>(p)];
    s.rows_from[static_cast<size_t>(p)] = ws.recv_rows[static_cast<size_t>(p)];
    if (p == me) continue;
    const auto bytes = static_cast<int64_t>(row_bytes);
    // Out: this rank's rows to p, then p's results back; in: the reverse.
    s.bytes_sent += (ws.send_rows[p] + ws.recv_rows[p]) * bytes;
    s.bytes_received += (ws.recv_rows[p] + ws.send_rows[p]) * bytes;
  }
  for (int64_t l = 0; l < l_count; ++l) {
    s.expert_rows[static_cast<size_t>(l)] = ws.local_offsets[l + 1] - ws.local_offsets[l];
  }
}

std::vector<RankLoad> ExpertParallelMoELayer::gather_stats(const Workspace& ws) {
  int64_t computed = 0;
  for (const int64_t n : ws.stats.expert_rows) computed += n;
  const int64_t mine[4] = {ws.stats.tokens, computed, ws.stats.bytes_sent, ws.stats.bytes_received};
  std::vector<int64_t> all(4 * static_cast<size_t>(comm_->size()));
  comm_->all_gather(mine, all);
  std::vector<RankLoad> out(static_cast<size_t>(comm_->size()));
  for (size_t p = 0; p < out.size(); ++p) {
    out[p] = {all[4 * p], all[4 * p + 1], all[4 * p + 2], all[4 * p + 3]};
  }
  return out;
}

ExpertParallelMoELayer load_expert_parallel_layer(const Checkpoint& ckpt, std::string_view prefix,
                                                  const MoeConfig& config,
                                                  std::shared_ptr<Communicator> comm,
                                                  ExpertPlacement placement,
                                                  const LoadOptions& options) {
  MOQE_CHECK(comm != nullptr, "load_expert_parallel_layer: no communicator");
  MOQE_CHECK(placement.num_experts() == config.for_layer(prefix).num_experts(),
             "{}: the placement has {} experts, the config of '{}' {}", ckpt.path().string(),
             placement.num_experts(), prefix, config.for_layer(prefix).num_experts());
  MOQE_CHECK(comm->size() == placement.ranks(),
             "load_expert_parallel_layer: the placement is for {} ranks, the communicator has {}",
             placement.ranks(), comm->size());
  MoeLayerParts parts =
      load_moe_parts(ckpt, prefix, config, options, placement.experts_of(comm->rank()));
  return ExpertParallelMoELayer(std::move(comm), std::move(placement), std::move(parts.router),
                                std::move(parts.experts), parts.hidden, std::move(parts.shared),
                                std::nullopt, std::move(parts.output_bias));
}

}  // namespace moqe
