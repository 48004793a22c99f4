{{/* Names. Namespaced objects are "<release>-<part>"; cluster-scoped ones (ClusterRoles and their
bindings) are "sandbox-k8s-<release>-<part>", unique per release and easy to find
(kubectl get clusterrole | grep sandbox-k8s). */}}
{{- define "osb.name" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "osb.clusterName" -}}
{{- printf "sandbox-k8s-%s" (include "osb.name" .) -}}
{{- end -}}

{{- define "osb.controllerName" -}}
{{- printf "%s-controller-manager" (include "osb.name" .) -}}
{{- end -}}

{{- define "osb.serverName" -}}
{{- printf "%s-server" (include "osb.name" .) -}}
{{- end -}}

{{- define "osb.sandboxTokenKeyName" -}}
{{- printf "%s-sandbox-token-key" (include "osb.name" .) -}}
{{- end -}}

{{- define "osb.metricsCertName" -}}
{{- printf "%s-metrics-cert" (include "osb.name" .) -}}
{{- end -}}

{{/* The namespace of everything namespaced: namespaceOverride, else the release's. */}}
{{- define "osb.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride -}}
{{- end -}}

{{- define "osb.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "osb.selector" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: opensandbox
{{- end -}}

{{/* Selectors: the common part and each workload's own labels (added to osb.labels on objects). */}}
{{- define "osb.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "osb.controllerOwn" -}}
app.kubernetes.io/component: controller
control-plane: controller-manager
{{- end -}}

{{- define "osb.serverOwn" -}}
app.kubernetes.io/component: server
{{- end -}}

{{- define "osb.controllerSelector" -}}
{{ include "osb.selector" . }}
{{ include "osb.controllerOwn" . }}
{{- end -}}

{{- define "osb.serverSelector" -}}
{{ include "osb.selector" . }}
{{ include "osb.serverOwn" . }}
{{- end -}}

{{/* ServiceAccounts: the controller's and the server's. With rbac.serviceAccount.create=false both
run as rbac.serviceAccount.name (or "default"), which then gets both roles. */}}
{{- define "osb.controllerServiceAccount" -}}
{{- if .Values.rbac.serviceAccount.create -}}
{{- default (include "osb.controllerName" .) .Values.rbac.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.rbac.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "osb.serverServiceAccount" -}}
{{- if .Values.rbac.serviceAccount.create -}}
{{- if .Values.rbac.serviceAccount.name -}}{{ .Values.rbac.serviceAccount.name }}-server{{- else -}}{{ include "osb.serverName" . }}{{- end -}}
{{- else -}}
{{- default "default" .Values.rbac.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "osb.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{/* True ("true") when the chart may render a cluster object it would share with other releases:
it does not exist yet, or this release owns it. An object created by someone else (kubectl, an
earlier release) is left alone instead of failing the install over its ownership. */}}
{{- define "osb.mayOwn" -}}
{{- $obj := lookup .apiVersion .kind .namespace .name -}}
{{- if not $obj -}}
{{- /* Absent, or lookup is off (helm install --dry-run): then the API server's discovery, which
a dry run does read, tells whether a CRD is there; rendering it would fail the ownership check. */ -}}
{{- if not (and .served (.root.Capabilities.APIVersions.Has .served)) -}}
true
{{- end -}}
{{- else -}}
{{- $ann := default (dict) $obj.metadata.annotations -}}
{{- if and (eq (get $ann "meta.helm.sh/release-name") .root.Release.Name) (eq (get $ann "meta.helm.sh/release-namespace") .root.Release.Namespace) -}}
true
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A restricted-profile container security context (Pod Security Standards). */}}
{{- define "osb.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "osb.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* A quantity ("500m", "1", 0.5, "128Mi", "1G") as a plain number, for comparisons. */}}
{{- define "osb.quantity" -}}
{{- $q := toString . -}}
{{- $num := regexFind "^[0-9.]+([eE][-+]?[0-9]+)?" $q -}}
{{- $suffix := trimPrefix $num $q -}}
{{- $mult := get (dict "" 1.0 "m" 0.001 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0) $suffix -}}
{{- mulf (float64 $num) (default 1.0 $mult) -}}
{{- end -}}

{{/* Resources with every limit at least its request: Kubernetes refuses a pod whose request is
above its limit, so raising only a request (e.g. requests.memory=256Mi with the 128Mi limit)
raises the limit with it. */}}
{{- define "osb.resources" -}}
{{- $r := deepCopy . -}}
{{- $limits := default (dict) $r.limits -}}
{{- range $name, $request := default (dict) $r.requests -}}
{{- $limit := get $limits $name -}}
{{- if and $limit (gt (float64 (include "osb.quantity" $request)) (float64 (include "osb.quantity" $limit))) -}}
{{- $_ := set $limits $name $request -}}
{{- end -}}
{{- end -}}
{{- if $limits }}{{ $_ := set $r "limits" $limits }}{{ end -}}
{{- toYaml $r -}}
{{- end -}}
