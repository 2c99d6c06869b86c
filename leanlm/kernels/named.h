/* Values handed to a C++ class by name (decode.cpp's Decoder takes its integers and floats this way): each is read
 * once, by name, and a name missing, unknown or given twice stops construction with that name, so the Python side
 * (runtime/steps/cpp.py's DecoderSpec) and the C++ side cannot drift apart silently. */
#pragma once
#include <c10/util/Exception.h>

#include <map>
#include <string>
#include <vector>

// Values given by name (the Decoder's integers and floats): each read once, by name; unknown names are errors.
template <typename V>
struct Named {
    std::map<std::string, V> values;
    Named(const std::vector<std::string> &names, const std::vector<V> &vals) {
        TORCH_CHECK(names.size() == vals.size(), "Decoder: ", names.size(), " names for ", vals.size(), " values");
        for (size_t j = 0; j < names.size(); j++)
            TORCH_CHECK(values.emplace(names[j], vals[j]).second, "Decoder: '", names[j], "' given twice");
    }
    V operator()(const std::string &name) {
        const auto it = values.find(name);
        TORCH_CHECK(it != values.end(), "Decoder: no value named '", name, "'");
        const V v = it->second;
        values.erase(it);
        return v;
    }
    void check_all_used() const {
        TORCH_CHECK(values.empty(), "Decoder: unknown value '", values.empty() ? "" : values.begin()->first, "'");
    }
};
