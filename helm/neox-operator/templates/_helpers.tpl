{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "neox-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects. */}}
{{- define "neox-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "neox-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "neox-operator.labels" -}}
helm.sh/chart: {{ include "neox-operator.chart" . }}
{{ include "neox-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: neox-serve
{{- end }}

{{- define "neox-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "neox-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "neox-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "neox-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The (Cluster)Role rules: exactly what the operator uses. */}}
{{- define "neox-operator.rules" -}}
- apiGroups: ["serving.neox.dev"]
  resources: ["neoxdeployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["serving.neox.dev"]
  resources: ["neoxdeployments/status"]
  verbs: ["get", "patch"]
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["list"]
{{- end }}

{{/* What namespace users may do with NeoXDeployments (aggregated into admin/edit and view). */}}
{{- define "neox-operator.userEditRules" -}}
- apiGroups: ["serving.neox.dev"]
  resources: ["neoxdeployments", "neoxdeployments/scale"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]
- apiGroups: ["serving.neox.dev"]
  resources: ["neoxdeployments/status"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{- define "neox-operator.userViewRules" -}}
- apiGroups: ["serving.neox.dev"]
  resources: ["neoxdeployments", "neoxdeployments/scale", "neoxdeployments/status"]
  verbs: ["get", "list", "watch"]
{{- end }}
