#include <fmt/format.h>

#include <fstream>
#include <sstream>

#include "gateway/detail/console.h"

namespace moemesh::gateway {

extern const char* const kConsoleHtml;  // generated from console/console.html

std::string_view console_html() {
  return kConsoleHtml;
}

Expected<std::string> console_asset(const std::string& dir, const std::string& file) {
  std::ifstream in(dir + "/" + file, std::ios::binary);
  if (!in)
    return Error(fmt::format(
        "{}/{} is missing: install Debian's libjs-chart.js or point --console-assets at a folder "
        "holding {} (the console works without charts)",
        dir, file, file));
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

}  // namespace moemesh::gateway
