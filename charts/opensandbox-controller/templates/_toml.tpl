{{/* The server's TOML file from server.config: one [section] per map, its keys as TOML values.
Nested maps become inline tables and lists arrays (e.g. kubernetes.defaultPodSpec). apiKey is left
out: it reaches the server from a Secret ($OPENSANDBOX_SERVER_API_KEY). kubernetes.namespace is
the chart's namespace, where the server's Role is; kubernetes.sandboxTokenKeyFile is the token key
Secret the chart mounts in the server and the controller (osb.sandboxTokenKeyName). */}}
{{- define "osb.tomlValue" -}}
{{- if kindIs "map" . -}}
{ {{- $first := true -}}{{- range $k, $v := . -}}{{- if not (kindIs "invalid" $v) -}}{{- if not $first }}, {{ end -}}{{- $first = false -}}{{ toJson $k }} = {{ include "osb.tomlValue" $v }}{{- end -}}{{- end -}} }
{{- else if kindIs "slice" . -}}
[{{- range $i, $v := . -}}{{- if $i }}, {{ end -}}{{ include "osb.tomlValue" $v }}{{- end -}}]
{{- else -}}
{{ toJson . }}
{{- end -}}
{{- end -}}

{{- define "osb.serverToml" -}}
{{- $config := deepCopy .Values.server.config -}}
{{- $k8s := default (dict) (get $config "kubernetes") -}}
{{- $_ := set $k8s "namespace" (include "osb.namespace" .) -}}
{{- $_ = set $k8s "sandboxTokenKeyFile" "/etc/opensandbox-sandbox-token/key" -}}
{{- $_ = set $config "kubernetes" $k8s -}}
# opensandbox-server configuration, rendered by the Helm chart from server.config.* (docs/server.md).
{{- range $section, $keys := $config }}

[{{ $section }}]
{{- range $key, $value := $keys }}
{{- if and (not (and (eq $section "server") (eq $key "apiKey"))) (not (kindIs "invalid" $value)) }}
{{ $key }} = {{ include "osb.tomlValue" $value }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}
