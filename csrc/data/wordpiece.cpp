// A fast path for BERT's WordPiece tokenization of ASCII text, bit-identical to the `tokenizers`
// library's BertWordPieceTokenizer (BertNormalizer + BertPreTokenizer + WordPiece) on ASCII input;
// bert_fast/data/prepare/wordpiece.py sends every non-ASCII sentence to `tokenizers` itself, where
// Unicode normalisation (accent stripping, CJK splitting, Unicode punctuation) matters.
//
// For ASCII the pipeline reduces to: drop control characters (0-31 except \t \n \r, and 127), treat
// \t \n \r and space as whitespace, lowercase (optional), split on whitespace and around each ASCII
// punctuation character, then greedy longest-match-first WordPiece with the "##" continuation
// prefix; a word longer than 100 characters, or with no match, becomes [UNK].
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

namespace py = pybind11;

namespace {

constexpr size_t kMaxWordChars = 100;

bool is_punct(unsigned char c) {
  return (c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) || (c >= 123 && c <= 126);
}

class WordPiece {
 public:
  WordPiece(const std::vector<std::string>& vocab, bool lowercase, int32_t unk_id)
      : lowercase_(lowercase), unk_id_(unk_id) {
    // A word listed twice takes its last id, as `tokenizers` reads a vocab file.
    for (size_t i = 0; i < vocab.size(); ++i) ids_[vocab[i]] = static_cast<int32_t>(i);
  }

  // Token ids of every sentence, concatenated, and the count per sentence.
  py::tuple encode(const std::vector<std::string>& sentences, int threads) const {
    const int64_t n = static_cast<int64_t>(sentences.size());
    std::vector<int64_t> lengths(n);
    if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n / 256)));
    std::vector<std::vector<int32_t>> parts(threads);
    {
      py::gil_scoped_release release;
      auto work = [&](int t) {
        std::string word;
        for (int64_t i = n * t / threads; i < n * (t + 1) / threads; ++i) {
          const size_t before = parts[t].size();
          encode_one(sentences[i], word, parts[t]);
          lengths[i] = static_cast<int64_t>(parts[t].size() - before);
        }
      };
      std::vector<std::thread> pool;
      for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
      work(0);
      for (auto& th : pool) th.join();
    }
    size_t total = 0;
    for (const auto& p : parts) total += p.size();
    py::array_t<int32_t> ids(static_cast<py::ssize_t>(total));
    int32_t* dst = ids.mutable_data();
    for (const auto& p : parts) dst = std::copy(p.begin(), p.end(), dst);
    py::array_t<int64_t> lens(static_cast<py::ssize_t>(n));
    std::copy(lengths.begin(), lengths.end(), lens.mutable_data());
    return py::make_tuple(ids, lens);
  }

 private:
  void encode_one(const std::string& text, std::string& word, std::vector<int32_t>& out) const {
    word.clear();
    for (unsigned char c : text) {
      if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
        flush(word, out);
      } else if (c < 32 || c == 127) {
        continue;  // control characters are removed (BertNormalizer clean_text)
      } else if (is_punct(c)) {
        flush(word, out);
        word.push_back(static_cast<char>(c));
        flush(word, out);
      } else {
        word.push_back(static_cast<char>(lowercase_ && c >= 'A' && c <= 'Z' ? c + 32 : c));
      }
    }
    flush(word, out);
  }

  void flush(std::string& word, std::vector<int32_t>& out) const {
    if (word.empty()) return;
    const size_t mark = out.size();
    bool bad = word.size() > kMaxWordChars;
    std::string piece;
    for (size_t start = 0; !bad && start < word.size();) {
      int32_t found = -1;
      size_t end = word.size();
      for (; end > start; --end) {
        piece.assign(start > 0 ? "##" : "");
        piece.append(word, start, end - start);
        auto it = ids_.find(piece);
        if (it != ids_.end()) {
          found = it->second;
          break;
        }
      }
      if (found < 0) {
        bad = true;
      } else {
        out.push_back(found);
        start = end;
      }
    }
    if (bad) {
      out.resize(mark);
      out.push_back(unk_id_);
    }
    word.clear();
  }

  std::unordered_map<std::string, int32_t> ids_;
  bool lowercase_;
  int32_t unk_id_;
};

}  // namespace

void register_wordpiece(py::module_& m) {
  py::class_<WordPiece>(m, "WordPiece")
      .def(py::init<const std::vector<std::string>&, bool, int32_t>(), py::arg("vocab"), py::arg("lowercase"),
           py::arg("unk_id"))
      .def("encode", &WordPiece::encode, py::arg("sentences"), py::arg("threads") = 0,
           "(ids int32 [T], lengths int64 [n]) of ASCII sentences");
}
