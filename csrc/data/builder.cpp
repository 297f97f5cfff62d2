// The sample builder: NSP/SOP pairs or packed sequences cut from tokenized documents, then
// dynamic MLM masking, written straight into preallocated numpy arrays.
//
// Algorithm: Google's create_pretraining_data.py (create_instances_from_document,
// truncate_seq_pair, create_masked_lm_predictions), ALBERT's sentence-order variant and
// RoBERTa-style packing. bert_fast/data/reference.py is the readable Python version of exactly
// this code, draw for draw; its docstring lists where both deliberately differ from Google's.
//
// Two phases, both parallel over threads with the GIL released:
//   plan(): per document (its own RNG stream), the token ranges of segments A and B and the label;
//   fill(): per sample (its own RNG stream), [CLS] A [SEP] B [SEP], masking, into row `rows[i]`.
// Plans are tiny (5 int64 per sample), so a data loader plans a whole epoch and fills batches on
// demand. No torch headers: this builds as its own small extension, bert_fast._data.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "rng.h"

namespace py = pybind11;
using bert_fast_data::Rng;

namespace {

constexpr int64_t kIgnore = -100;
enum Objective : int { kNsp = 0, kSop = 1, kNone = 2 };

struct Settings {
  int64_t max_seq_length = 128;
  int objective = kNsp;
  double mask_prob = 0.15;
  int64_t predictions = 20;
  double short_seq_prob = 0.1;
  bool whole_word_mask = false;
  uint64_t seed = 0;
  int64_t vocab_size = 30522;
  int64_t pad_id = 0, cls_id = 101, sep_id = 102, mask_id = 103;
};

using Row = std::array<int64_t, 5>;  // a_begin, a_end, b_begin, b_end, label

// Threads for n items: `threads` (0 = all cores), at most one per 64 items.
int thread_count(int64_t n, int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n / 64)));
}

// body(begin, end, thread) over contiguous slices of [0, n).
template <typename F>
void parallel_for(int64_t n, int threads, F&& body) {
  if (threads <= 1) {
    body(0, n, 0);
    return;
  }
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] { body(n * t / threads, n * (t + 1) / threads, t); });
  }
  for (auto& th : pool) th.join();
}

// truncate_seq_pair on ranges: drop the front or back token (at random) of the longer segment.
void truncate_pair(int64_t* a, int64_t* b, int64_t max_tokens, Rng& rng) {
  while ((a[1] - a[0]) + (b[1] - b[0]) > max_tokens) {
    int64_t* longer = (a[1] - a[0] > b[1] - b[0]) ? a : b;
    if (rng.random() < 0.5) {
      longer[0] += 1;
    } else {
      longer[1] -= 1;
    }
  }
}

// create_instances_from_document for document `doc`, appending rows to `out`.
void plan_document(int64_t doc, const int64_t* sent, const int64_t* docs, int64_t n_docs,
                   const Settings& s, uint64_t epoch, std::vector<Row>& out) {
  Rng rng(s.seed, epoch, static_cast<uint64_t>(doc), bert_fast_data::kDomainPlan);
  const int64_t first = docs[doc], last = docs[doc + 1];
  const int64_t max_tokens = s.max_seq_length - 3;
  int64_t target = max_tokens;
  if (rng.random() < s.short_seq_prob) target = rng.randint(2, max_tokens);
  int64_t chunk_start = first, length = 0;
  for (int64_t i = first; i < last; ++i) {
    length += sent[i + 1] - sent[i];
    if (!(i == last - 1 || length >= target)) continue;
    const int64_t k = i + 1 - chunk_start;
    const int64_t a_end = k >= 2 ? rng.randint(1, k - 1) : 1;
    int64_t a[2] = {sent[chunk_start], sent[chunk_start + a_end]};
    int64_t b[2] = {a[1], sent[i + 1]};
    int64_t label = 0;
    bool keep = true;
    if (s.objective == kNsp) {
      if (k == 1 || rng.random() < 0.5) {
        label = 1;
        const int64_t target_b = target - (a[1] - a[0]);
        int64_t other = doc;
        for (int attempt = 0; attempt < 10; ++attempt) {
          other = rng.randint(0, n_docs - 1);
          if (other != doc) break;
        }
        const int64_t o_first = docs[other], o_last = docs[other + 1];
        int64_t j = o_first + rng.randint(0, o_last - o_first - 1);
        b[0] = b[1] = sent[j];
        for (; j < o_last; ++j) {
          b[1] = sent[j + 1];
          if (b[1] - b[0] >= target_b) break;
        }
        i -= k - a_end;  // the unused sentences start the next chunk ("put back")
      }
    } else if (k == 1 && a[1] - a[0] < 2) {
      keep = false;  // sop: a one-token sentence cannot be split into A and B
    } else {
      if (k == 1) {
        const int64_t cut = a[0] + rng.randint(1, a[1] - a[0] - 1);
        b[0] = cut;
        b[1] = a[1];
        a[1] = cut;
      }
      if (rng.random() < 0.5) {
        std::swap(a[0], b[0]);
        std::swap(a[1], b[1]);
        label = 1;
      }
    }
    if (keep) {
      truncate_pair(a, b, max_tokens, rng);
      out.push_back({a[0], a[1], b[0], b[1], label});
    }
    chunk_start = i + 1;
    length = 0;
  }
}

// RoBERTa-style packing for `none` (reference.plan_packed).
void plan_packed(const int64_t* sent, const int64_t* docs, int64_t n_docs, const Settings& s,
                 std::vector<Row>& out) {
  const int64_t budget = s.max_seq_length - 2;
  int64_t used = 0, start = 0, p = 0;
  for (int64_t d = 0; d < n_docs; ++d) {
    p = sent[docs[d]];
    const int64_t end = sent[docs[d + 1]];
    while (p < end) {
      if (used == 0) start = p;
      const int64_t take = std::min(end - p, budget - used);
      used += take;
      p += take;
      if (used == budget) {
        out.push_back({start, p, 0, 0, kIgnore});
        used = 0;
      }
    }
    if (used > 0) {
      if (used + 1 < budget) {
        used += 1;
      } else {
        out.push_back({start, p, 0, 0, kIgnore});
        used = 0;
      }
    }
  }
  if (used > 0) out.push_back({start, p, 0, 0, kIgnore});
}

template <typename T>
using Array = py::array_t<T, py::array::c_style>;

template <typename T>
const T* data_of(const Array<T>& a, const char* name, int ndim) {
  if (a.ndim() != ndim) {
    throw std::invalid_argument(std::string(name) + " must have " + std::to_string(ndim) +
                                " dimension(s)");
  }
  return a.data();
}

void check_offsets(const int64_t* v, int64_t n, int64_t limit, const char* name) {
  if (n < 1 || v[0] != 0) throw std::invalid_argument(std::string(name) + " must start at 0");
  for (int64_t i = 1; i < n; ++i) {
    if (v[i] < v[i - 1]) throw std::invalid_argument(std::string(name) + " must be non-decreasing");
  }
  if (limit >= 0 && v[n - 1] != limit) {
    throw std::invalid_argument(std::string(name) + " must end at " + std::to_string(limit));
  }
}

py::array_t<int64_t> plan(const Array<int64_t>& sentences, const Array<int64_t>& documents,
                          const Settings& s, uint64_t epoch, int threads) {
  const int64_t* sent = data_of(sentences, "sentences", 1);
  const int64_t* docs = data_of(documents, "documents", 1);
  const int64_t n_sent = sentences.shape(0) - 1, n_docs = documents.shape(0) - 1;
  check_offsets(sent, sentences.shape(0), -1, "sentences");
  check_offsets(docs, documents.shape(0), n_sent, "documents");
  for (int64_t d = 0; d < n_docs; ++d) {
    if (docs[d + 1] == docs[d]) throw std::invalid_argument("documents: every document needs a sentence");
  }
  for (int64_t i = 0; i < n_sent; ++i) {
    if (sent[i + 1] == sent[i]) throw std::invalid_argument("sentences: every sentence needs a token");
  }
  std::vector<Row> rows;
  {
    py::gil_scoped_release release;
    if (s.objective == kNone) {
      plan_packed(sent, docs, n_docs, s, rows);
    } else {
      const int t_count = thread_count(n_docs, threads);
      std::vector<std::vector<Row>> parts(static_cast<size_t>(t_count));
      parallel_for(n_docs, t_count, [&](int64_t lo, int64_t hi, int t) {
        for (int64_t d = lo; d < hi; ++d) plan_document(d, sent, docs, n_docs, s, epoch, parts[t]);
      });
      for (auto& part : parts) rows.insert(rows.end(), part.begin(), part.end());
    }
  }
  py::array_t<int64_t> out({static_cast<py::ssize_t>(rows.size()), static_cast<py::ssize_t>(5)});
  int64_t* dst = out.mutable_data();
  for (const Row& row : rows) dst = std::copy(row.begin(), row.end(), dst);
  return out;
}

// Per-thread scratch for one sequence.
struct Scratch {
  std::vector<int32_t> ids;
  std::vector<int8_t> types, starts, special;
  std::vector<int64_t> group_begin, order, positions;
  std::vector<std::pair<int64_t, int32_t>> chosen;
};

template <typename Tok>
void fill_one(const Tok* tokens, const uint8_t* word_starts, const int64_t* doc_starts, int64_t n_doc_starts,
              const int64_t* r, uint64_t key, const Settings& s, uint64_t epoch, Scratch& w,
              int32_t* ids_out, int8_t* types_out, int32_t* length_out, int32_t* pos_out,
              int32_t* labels_out, int32_t* nsp_out) {
  w.ids.clear(); w.types.clear(); w.starts.clear(); w.special.clear();
  auto push = [&](int32_t id, int8_t type, int8_t start, int8_t special) {
    w.ids.push_back(id); w.types.push_back(type); w.starts.push_back(start); w.special.push_back(special);
  };
  push(static_cast<int32_t>(s.cls_id), 0, 1, 1);
  if (s.objective == kNone) {
    // Documents starting strictly inside [r0, r1) get a [SEP] before their first token.
    const int64_t* d = std::upper_bound(doc_starts, doc_starts + n_doc_starts, r[0]);
    for (int64_t t = r[0]; t < r[1]; ++t) {
      if (d < doc_starts + n_doc_starts && *d == t) {
        push(static_cast<int32_t>(s.sep_id), 0, 1, 1);
        ++d;
      }
      push(static_cast<int32_t>(tokens[t]), 0, static_cast<int8_t>(word_starts[t] != 0), 0);
    }
    push(static_cast<int32_t>(s.sep_id), 0, 1, 1);
  } else {
    for (int seg = 0; seg < 2; ++seg) {
      for (int64_t t = r[2 * seg]; t < r[2 * seg + 1]; ++t) {
        push(static_cast<int32_t>(tokens[t]), static_cast<int8_t>(seg),
             static_cast<int8_t>(word_starts[t] != 0), 0);
      }
      push(static_cast<int32_t>(s.sep_id), static_cast<int8_t>(seg), 1, 1);
    }
  }
  const int64_t n = static_cast<int64_t>(w.ids.size());

  // create_masked_lm_predictions: (whole-)word groups in random order, greedily up to budget.
  Rng rng(s.seed, epoch, key, bert_fast_data::kDomainMask);
  w.group_begin.clear();
  int64_t candidates = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (w.special[i]) continue;
    ++candidates;
    if (!(s.whole_word_mask && !w.group_begin.empty() && !w.starts[i] && !w.special[i - 1])) {
      w.group_begin.push_back(i);
    }
  }
  const int64_t n_groups = static_cast<int64_t>(w.group_begin.size());
  w.order.resize(n_groups);
  for (int64_t g = 0; g < n_groups; ++g) w.order[g] = g;
  for (int64_t i = n_groups - 1; i > 0; --i) {
    std::swap(w.order[i], w.order[rng.below(static_cast<uint64_t>(i + 1))]);
  }
  const int64_t budget = std::min<int64_t>(
      s.predictions, std::max<int64_t>(1, static_cast<int64_t>(std::floor(candidates * s.mask_prob + 0.5))));
  w.chosen.clear();
  for (int64_t g : w.order) {
    const int64_t size = static_cast<int64_t>(w.chosen.size());
    if (size >= budget) break;
    // A group runs from its first position to the next non-special position that starts a group.
    int64_t begin = w.group_begin[g], end = begin + 1;
    while (end < n && !w.special[end] && (g + 1 >= n_groups || end < w.group_begin[g + 1])) ++end;
    if (size + (end - begin) > budget) continue;
    for (int64_t i = begin; i < end; ++i) {
      const int32_t original = w.ids[i];
      const uint64_t action = rng.below(10);
      if (action < 8) {
        w.ids[i] = static_cast<int32_t>(s.mask_id);
      } else if (action == 9) {
        w.ids[i] = static_cast<int32_t>(rng.below(static_cast<uint64_t>(s.vocab_size)));
      }
      w.chosen.emplace_back(i, original);
    }
  }
  std::sort(w.chosen.begin(), w.chosen.end());

  const int64_t S = s.max_seq_length;
  std::copy(w.ids.begin(), w.ids.end(), ids_out);
  std::fill(ids_out + n, ids_out + S, static_cast<int32_t>(s.pad_id));
  std::copy(w.types.begin(), w.types.end(), types_out);
  std::fill(types_out + n, types_out + S, 0);
  *length_out = static_cast<int32_t>(n);
  std::fill(pos_out, pos_out + s.predictions, 0);
  std::fill(labels_out, labels_out + s.predictions, static_cast<int32_t>(kIgnore));
  for (size_t j = 0; j < w.chosen.size(); ++j) {
    pos_out[j] = static_cast<int32_t>(w.chosen[j].first);
    labels_out[j] = w.chosen[j].second;
  }
  *nsp_out = static_cast<int32_t>(r[4]);
}

template <typename Tok>
void fill_impl(const Array<Tok>& tokens, const Array<uint8_t>& word_starts, const Array<int64_t>& doc_starts,
               const Array<int64_t>& plan_rows, const Array<int64_t>& keys, const Array<int64_t>& rows,
               const Settings& s, uint64_t epoch, Array<int32_t>& input_ids, Array<int8_t>& token_type_ids,
               Array<int32_t>& lengths, Array<int32_t>& mlm_positions, Array<int32_t>& mlm_labels,
               Array<int32_t>& nsp_label, int threads) {
  const Tok* tok = data_of(tokens, "tokens", 1);
  const uint8_t* starts = data_of(word_starts, "word_starts", 1);
  const int64_t* dstarts = data_of(doc_starts, "doc_starts", 1);
  const int64_t* plan_p = data_of(plan_rows, "plan", 2);
  const int64_t* key_p = data_of(keys, "keys", 1);
  const int64_t* row_p = data_of(rows, "rows", 1);
  const int64_t n_tokens = tokens.shape(0), m = plan_rows.shape(0), S = s.max_seq_length, P = s.predictions;
  if (word_starts.shape(0) != n_tokens) {
    throw std::invalid_argument("word_starts must match tokens in length");
  }
  if (plan_rows.shape(1) != 5) throw std::invalid_argument("plan must have 5 columns");
  if (keys.shape(0) != m || rows.shape(0) != m) {
    throw std::invalid_argument("keys and rows must match plan rows");
  }
  data_of(input_ids, "input_ids", 2);
  const int64_t B = input_ids.shape(0);
  if (input_ids.shape(1) != S || token_type_ids.ndim() != 2 || token_type_ids.shape(0) != B ||
      token_type_ids.shape(1) != S) {
    throw std::invalid_argument("input_ids and token_type_ids must be [batch, max_seq_length]");
  }
  if (mlm_positions.ndim() != 2 || mlm_positions.shape(0) != B || mlm_positions.shape(1) != P ||
      mlm_labels.ndim() != 2 || mlm_labels.shape(0) != B || mlm_labels.shape(1) != P) {
    throw std::invalid_argument("mlm_positions and mlm_labels must be [batch, predictions]");
  }
  if (lengths.ndim() != 1 || lengths.shape(0) != B || nsp_label.ndim() != 1 || nsp_label.shape(0) != B) {
    throw std::invalid_argument("lengths and nsp_label must be [batch]");
  }
  std::vector<char> taken(static_cast<size_t>(B), 0);  // two samples in one row would race
  for (int64_t i = 0; i < m; ++i) {
    const int64_t* r = plan_p + 5 * i;
    if (row_p[i] < 0 || row_p[i] >= B) throw std::invalid_argument("rows: index out of range");
    if (taken[row_p[i]]++) throw std::invalid_argument("rows: row " + std::to_string(row_p[i]) + " given twice");
    bool ok = 0 <= r[0] && r[0] < r[1] && r[1] <= n_tokens;
    int64_t length = r[1] - r[0] + 2;
    if (s.objective == kNone) {
      const int64_t* lo = std::upper_bound(dstarts, dstarts + doc_starts.shape(0), r[0]);
      const int64_t* hi = std::lower_bound(dstarts, dstarts + doc_starts.shape(0), r[1]);
      length += std::max<int64_t>(0, hi - lo);
    } else {
      ok = ok && 0 <= r[2] && r[2] < r[3] && r[3] <= n_tokens;
      length += r[3] - r[2] + 1;
    }
    if (!ok || length > S) {
      throw std::invalid_argument("plan row " + std::to_string(i) + " is out of range for these tokens");
    }
  }
  int32_t* ids_p = input_ids.mutable_data();
  int8_t* types_p = token_type_ids.mutable_data();
  int32_t* len_p = lengths.mutable_data();
  int32_t* pos_p = mlm_positions.mutable_data();
  int32_t* lab_p = mlm_labels.mutable_data();
  int32_t* nsp_p = nsp_label.mutable_data();
  const int64_t n_dstarts = doc_starts.shape(0);
  py::gil_scoped_release release;
  parallel_for(m, thread_count(m, threads), [&](int64_t lo, int64_t hi, int) {
    Scratch w;
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t row = row_p[i];
      fill_one(tok, starts, dstarts, n_dstarts, plan_p + 5 * i, static_cast<uint64_t>(key_p[i]), s, epoch,
               w, ids_p + row * S, types_p + row * S, len_p + row, pos_p + row * P, lab_p + row * P,
               nsp_p + row);
    }
  });
}

void fill(const py::array& tokens, const Array<uint8_t>& word_starts, const Array<int64_t>& doc_starts,
          const Array<int64_t>& plan_rows, const Array<int64_t>& keys, const Array<int64_t>& rows,
          const Settings& s, uint64_t epoch, Array<int32_t>& input_ids, Array<int8_t>& token_type_ids,
          Array<int32_t>& lengths, Array<int32_t>& mlm_positions, Array<int32_t>& mlm_labels,
          Array<int32_t>& nsp_label, int threads) {
  if (py::isinstance<Array<uint16_t>>(tokens)) {
    fill_impl(tokens.cast<Array<uint16_t>>(), word_starts, doc_starts, plan_rows, keys, rows, s, epoch,
              input_ids, token_type_ids, lengths, mlm_positions, mlm_labels, nsp_label, threads);
  } else if (py::isinstance<Array<int32_t>>(tokens)) {
    fill_impl(tokens.cast<Array<int32_t>>(), word_starts, doc_starts, plan_rows, keys, rows, s, epoch,
              input_ids, token_type_ids, lengths, mlm_positions, mlm_labels, nsp_label, threads);
  } else {
    throw py::type_error("tokens must be a contiguous uint16 or int32 array");
  }
}

}  // namespace

void register_wordpiece(py::module_& m);  // wordpiece.cpp

PYBIND11_MODULE(_data, m) {
  m.doc() = "bert_fast's C++ pretraining sample builder (see bert_fast/data/builder.py)";
  py::class_<Settings>(m, "Settings")
      .def(py::init<>())
      .def_readwrite("max_seq_length", &Settings::max_seq_length)
      .def_readwrite("objective", &Settings::objective)
      .def_readwrite("mask_prob", &Settings::mask_prob)
      .def_readwrite("predictions", &Settings::predictions)
      .def_readwrite("short_seq_prob", &Settings::short_seq_prob)
      .def_readwrite("whole_word_mask", &Settings::whole_word_mask)
      .def_readwrite("seed", &Settings::seed)
      .def_readwrite("vocab_size", &Settings::vocab_size)
      .def_readwrite("pad_id", &Settings::pad_id)
      .def_readwrite("cls_id", &Settings::cls_id)
      .def_readwrite("sep_id", &Settings::sep_id)
      .def_readwrite("mask_id", &Settings::mask_id);
  m.def("plan", &plan, py::arg("sentences"), py::arg("documents"), py::arg("settings"), py::arg("epoch"),
        py::arg("threads") = 0);
  m.def("fill", &fill, py::arg("tokens"), py::arg("word_starts"), py::arg("doc_starts"), py::arg("plan"),
        py::arg("keys"), py::arg("rows"), py::arg("settings"), py::arg("epoch"), py::arg("input_ids"),
        py::arg("token_type_ids"), py::arg("lengths"), py::arg("mlm_positions"), py::arg("mlm_labels"),
        py::arg("nsp_label"), py::arg("threads") = 0);
  register_wordpiece(m);
}
