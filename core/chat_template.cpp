// Chat templates (core/chat_template.h): the public API over the interpreter of
// core/detail/jinja_*.h, and the model-directory loader.
#include "core/chat_template.h"

#include <fmt/format.h>

#include <fstream>
#include <new>
#include <sstream>

#include "core/detail/jinja_ast.h"
#include "core/detail/jinja_eval.h"

namespace moemesh {

struct ChatTemplateAccess {
  static const jinja::TemplateAst* ast(const ChatTemplate& t) { return t.ast_.get(); }
};

namespace {

using jinja::DictData;
using jinja::Value;

// The special tokens transformers passes to templates (SPECIAL_TOKENS_ATTRIBUTES).
constexpr const char* kSpecialTokens[] = {"bos_token", "eos_token", "unk_token", "sep_token",
                                          "pad_token", "cls_token", "mask_token"};

// Parameters of transformers' apply_chat_template: passing one as a template variable would not do
// what it does in transformers.
constexpr const char* kApplyParameters[] = {"conversation",
                                            "chat_template",
                                            "continue_final_message",
                                            "tokenize",
                                            "padding",
                                            "truncation",
                                            "max_length",
                                            "return_tensors",
                                            "return_dict",
                                            "return_assistant_tokens_mask",
                                            "tokenizer_kwargs",
                                            "sanitize_control_tokens"};

Expected<std::string> render_value(const jinja::TemplateAst* ast, const Value& vars) {
  if (!ast) return std::string();
  try {
    return jinja::render_ast(*ast, vars);
  } catch (const jinja::RenderError& e) {
    return Error(fmt::format("chat template line {}: {}", e.line(), e.what()));
  } catch (const std::bad_alloc&) {
    return Error("chat template: out of memory while rendering");
  } catch (const std::exception& e) {
    return Error(fmt::format("chat template: {}", e.what()));
  }
}

template <class J>
Expected<std::string> render_json(const jinja::TemplateAst* ast, const J& variables) {
  if (!variables.is_object())
    return Error(fmt::format("chat template variables must be a JSON object, found {}",
                             variables.type_name()));
  try {
    return render_value(ast, jinja::from_json(variables));
  } catch (const jinja::RenderError& e) {
    return Error(fmt::format("chat template variables: {}", e.what()));
  }
}

Expected<std::string> read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Error(fmt::format("{}: cannot open for reading", path.string()));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return Error(fmt::format("{}: read error", path.string()));
  return ss.str();
}

// A template's text and where it was read, for error messages.
struct TemplateSource {
  std::string text;
  std::string origin;
};

// The templates of model_dir, by name, with "default" for the unnamed one.
Expected<std::map<std::string, TemplateSource>> read_templates(const std::filesystem::path& dir,
                                                               const nlohmann::json* config,
                                                               const std::string& config_path) {
  std::map<std::string, TemplateSource> out;
  std::error_code ec;
  const auto jinja_file = dir / "chat_template.jinja";
  if (std::filesystem::is_regular_file(jinja_file, ec)) {
    Expected<std::string> text = read_file(jinja_file);
    if (!text) return text.error();
    out["default"] = {std::move(*text), jinja_file.string()};
  }
  const auto extra_dir = dir / "additional_chat_templates";
  if (std::filesystem::is_directory(extra_dir, ec)) {
    for (const auto& entry : std::filesystem::directory_iterator(extra_dir, ec)) {
      if (entry.path().extension() != ".jinja") continue;
      Expected<std::string> text = read_file(entry.path());
      if (!text) return text.error();
      out[entry.path().stem().string()] = {std::move(*text), entry.path().string()};
    }
    if (ec) return Error(fmt::format("{}: cannot list: {}", extra_dir.string(), ec.message()));
  }
  if (!out.empty() || !config || !config->contains("chat_template") ||
      config->at("chat_template").is_null())
    return out;
  const nlohmann::json& ct = config->at("chat_template");
  if (ct.is_string()) {
    out["default"] = {ct.get<std::string>(), config_path + " field \"chat_template\""};
    return out;
  }
  if (!ct.is_array())
    return Error(
        fmt::format("{}: field \"chat_template\" must be a string or a list of {{\"name\", "
                    "\"template\"}} objects, found {}",
                    config_path, ct.type_name()));
  for (size_t i = 0; i < ct.size(); ++i) {
    const nlohmann::json& e = ct[i];
    if (!e.is_object() || !e.contains("name") || !e["name"].is_string() ||
        !e.contains("template") || !e["template"].is_string())
      return Error(
          fmt::format("{}: field \"chat_template\"[{}] must be an object with string fields "
                      "\"name\" and \"template\"",
                      config_path, i));
    const std::string name = e["name"].get<std::string>();
    out[name] = {e["template"].get<std::string>(),
                 fmt::format("{} field \"chat_template\" (template \"{}\")", config_path, name)};
  }
  return out;
}

// bos_token, ...: a string, an AddedToken object {"content": ...}, or null.
Status read_special_tokens(const nlohmann::json& src, const std::string& path,
                           nlohmann::json& tokens) {
  for (const char* key : kSpecialTokens) {
    if (!src.contains(key) || src[key].is_null()) continue;
    const nlohmann::json& v = src[key];
    if (v.is_string()) {
      tokens[key] = v.get<std::string>();
    } else if (v.is_object() && v.contains("content") && v["content"].is_string()) {
      tokens[key] = v["content"].get<std::string>();
    } else {
      return Error(
          fmt::format("{}: field \"{}\" must be a string or an AddedToken object with a string "
                      "\"content\", found {}",
                      path, key, v.dump()));
    }
  }
  return {};
}

Expected<nlohmann::json> read_json(const std::filesystem::path& path) {
  Expected<std::string> text = read_file(path);
  if (!text) return text.error();
  nlohmann::json j = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Error(fmt::format("{}: not valid JSON", path.string()));
  if (!j.is_object())
    return Error(fmt::format("{}: expected a JSON object, found {}", path.string(), j.type_name()));
  return j;
}

// One message as transformers 5 passes it: keys with null values dropped, and the reasoning under
// both reasoning_content and thinking (_alias_reasoning_fields).
template <class J>
Expected<Value> message_value(const J& m, size_t index) {
  if (!m.is_object())
    return Error(fmt::format("apply_chat_template: message {} must be a JSON object, found {}",
                             index, m.type_name()));
  DictData d;
  for (auto it = m.begin(); it != m.end(); ++it)
    if (!it->is_null()) d.set(it.key(), jinja::from_json(*it));
  const Value* reasoning = nullptr;
  for (const char* k : {"reasoning_content", "thinking", "reasoning"})
    if (!reasoning) reasoning = d.find(k);
  if (!reasoning) return Value::dict(std::move(d));
  const Value r = *reasoning;
  DictData aliased;
  aliased.set("thinking", r);
  for (auto& [k, v] : d.items) aliased.set(k, std::move(v));
  aliased.set("reasoning_content", r);
  return Value::dict(std::move(aliased));
}

template <class J>
Expected<std::string> apply_impl(const ChatTemplateConfig& config, const J& messages,
                                 bool add_generation_prompt, const J& extra) {
  if (!messages.is_array())
    return Error(fmt::format(
        "apply_chat_template: messages must be a JSON array of message objects, found {}",
        messages.type_name()));
  if (messages.empty())
    return Error("apply_chat_template: cannot apply a chat template to an empty conversation");
  if (!extra.is_object())
    return Error(fmt::format("apply_chat_template: extra variables must be a JSON object, found {}",
                             extra.type_name()));
  for (const char* key : {"messages", "add_generation_prompt"})
    if (extra.contains(key))
      return Error(fmt::format(
          "apply_chat_template: extra variable \"{}\" conflicts with the argument of that name",
          key));
  for (const char* key : kApplyParameters)
    if (extra.contains(key))
      return Error(
          fmt::format("apply_chat_template: \"{}\" is a parameter of transformers' "
                      "apply_chat_template, not a template variable; moemesh does not support it",
                      key));
  try {
    std::vector<Value> msgs;
    for (size_t i = 0; i < messages.size(); ++i) {
      Expected<Value> m = message_value(messages[i], i);
      if (!m) return m.error();
      msgs.push_back(std::move(*m));
    }
    DictData vars;
    for (const auto& [k, v] : config.special_tokens.items()) vars.set(k, jinja::from_json(v));
    Value tools = Value::none(), documents = Value::none();
    for (auto it = extra.begin(); it != extra.end(); ++it) {
      if (it.key() == "tools") {
        tools = jinja::from_json(*it);
      } else if (it.key() == "documents") {
        documents = jinja::from_json(*it);
      } else {
        vars.set(it.key(), jinja::from_json(*it));
      }
    }
    if (!tools.is_none()) {
      if (!tools.is_seq())
        return Error("apply_chat_template: \"tools\" must be a list of JSON schemas (objects)");
      for (const Value& t : tools.items())
        if (!t.is_dict())
          return Error("apply_chat_template: every tool must be a JSON schema (an object), found " +
                       t.type_name());
    }
    if (!documents.is_none()) {
      if (!documents.is_seq())
        return Error("apply_chat_template: \"documents\" must be a list of objects");
      for (const Value& d : documents.items())
        if (!d.is_dict())
          return Error(
              "apply_chat_template: documents should be a list of dicts with 'title' and 'text' "
              "keys");
    }
    vars.set("messages", Value::seq(std::move(msgs)));
    vars.set("tools", tools);
    vars.set("documents", documents);
    vars.set("add_generation_prompt", Value::boolean(add_generation_prompt));
    const ChatTemplate* tmpl = &config.chat_template;
    if (!tools.is_none()) {
      auto it = config.named_templates.find("tool_use");
      if (it != config.named_templates.end()) tmpl = &it->second;
    }
    return render_value(ChatTemplateAccess::ast(*tmpl), Value::dict(std::move(vars)));
  } catch (const jinja::RenderError& e) {
    return Error(fmt::format("apply_chat_template: {}", e.what()));
  }
}

}  // namespace

ChatTemplate::ChatTemplate() : source_(std::make_shared<const std::string>()) {}

Expected<ChatTemplate> ChatTemplate::parse(std::string_view source) {
  ChatTemplate t;
  try {
    t.ast_ = jinja::parse_template(source);
  } catch (const jinja::ParseError& e) {
    return Error(fmt::format("chat template line {}: {}", e.line(), e.what()));
  } catch (const std::bad_alloc&) {
    return Error("chat template: out of memory while parsing");
  }
  t.source_ = std::make_shared<const std::string>(source);
  return t;
}

Expected<std::string> ChatTemplate::render(const nlohmann::json& variables) const {
  return render_json(ast_.get(), variables);
}

Expected<std::string> ChatTemplate::render_ordered(const nlohmann::ordered_json& variables) const {
  return render_json(ast_.get(), variables);
}

Expected<ChatTemplateConfig> load_chat_template(const std::filesystem::path& model_dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(model_dir, ec))
    return Error(fmt::format("{}: not a model directory", model_dir.string()));
  const auto config_path = model_dir / "tokenizer_config.json";
  std::optional<nlohmann::json> config;
  if (std::filesystem::exists(config_path, ec)) {
    Expected<nlohmann::json> j = read_json(config_path);
    if (!j) return j.error();
    config = std::move(*j);
  }
  Expected<std::map<std::string, TemplateSource>> sources =
      read_templates(model_dir, config ? &*config : nullptr, config_path.string());
  if (!sources) return sources.error();
  if (sources->empty())
    return Error(
        fmt::format("{}: no chat template (neither chat_template.jinja nor a \"chat_template\" "
                    "field in tokenizer_config.json)",
                    model_dir.string()));
  ChatTemplateConfig out;
  for (const auto& [name, src] : *sources) {
    Expected<ChatTemplate> t = ChatTemplate::parse(src.text);
    if (!t) return Error(fmt::format("{}: {}", src.origin, t.error().message()));
    out.named_templates.emplace(name, std::move(*t));
  }
  auto def = out.named_templates.find("default");
  if (def == out.named_templates.end()) {
    std::string names;
    for (const auto& kv : out.named_templates) names += (names.empty() ? "" : ", ") + kv.first;
    return Error(
        fmt::format("{}: the model has several chat templates ({}) and none named \"default\"",
                    model_dir.string(), names));
  }
  out.chat_template = def->second;
  out.special_tokens = nlohmann::json::object();
  if (config) {
    Status s = read_special_tokens(*config, config_path.string(), out.special_tokens);
    if (!s) return s.error();
    const auto legacy = model_dir / "special_tokens_map.json";
    if (!config->contains("added_tokens_decoder") && std::filesystem::exists(legacy, ec)) {
      Expected<nlohmann::json> j = read_json(legacy);
      if (!j) return j.error();
      Status s2 = read_special_tokens(*j, legacy.string(), out.special_tokens);
      if (!s2) return s2.error();
    }
  }
  return out;
}

Expected<std::string> apply_chat_template(const ChatTemplateConfig& config,
                                          const nlohmann::json& messages,
                                          bool add_generation_prompt, const nlohmann::json& extra) {
  return apply_impl(config, messages, add_generation_prompt, extra);
}

Expected<std::string> apply_chat_template_ordered(const ChatTemplateConfig& config,
                                                  const nlohmann::ordered_json& messages,
                                                  bool add_generation_prompt,
                                                  const nlohmann::ordered_json& extra) {
  return apply_impl(config, messages, add_generation_prompt, extra);
}

}  // namespace moemesh
