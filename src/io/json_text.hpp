// Short, safe text of a JSON value for error messages. Values come from hostile files: they may
// be nested a million levels deep (nlohmann's dump() recurses once per level and would overflow
// the stack) or megabytes long, so depth and length are capped.
#pragma once

#include <nlohmann/json.hpp>

#include <cstddef>
#include <string>
#include <string_view>

namespace moqe::detail {

inline void json_brief_into(const nlohmann::json& v, int depth, size_t max_chars,
                            std::string& out) {
  if (out.size() > max_chars) return;
  if (!v.is_structured()) {
    // Primitives do not recurse; invalid UTF-8 is replaced rather than thrown.
    std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    if (s.size() > max_chars) s = s.substr(0, max_chars) + "...";
    out += s;
    return;
  }
  if (depth == 0) {
    out += v.is_array() ? "[...]" : "{...}";
    return;
  }
  out += v.is_array() ? '[' : '{';
  bool first = true;
  for (auto it = v.begin(); it != v.end(); ++it) {
    if (!first) out += ',';
    first = false;
    if (out.size() > max_chars) {
      out += "...";
      break;
    }
    if (v.is_object()) {
      json_brief_into(nlohmann::json(it.key()), 0, max_chars, out);
      out += ':';
    }
    json_brief_into(*it, depth - 1, max_chars, out);
  }
  out += v.is_array() ? ']' : '}';
}

// As dump() writes it for shallow, short values ("[14336,4096]"); "[[...]]" and "..." beyond.
inline std::string json_brief(const nlohmann::json& v, int max_depth = 3, size_t max_chars = 120) {
  std::string out;
  json_brief_into(v, max_depth, max_chars, out);
  return out;
}

// At most max_chars of a text from a file, for messages.
inline std::string text_brief(std::string_view s, size_t max_chars = 200) {
  return s.size() <= max_chars ? std::string(s) : std::string(s.substr(0, max_chars)) + "...";
}

}  // namespace moqe::detail
