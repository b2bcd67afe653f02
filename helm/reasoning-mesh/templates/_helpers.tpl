{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "reasoning-mesh.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name. */}}
{{- define "reasoning-mesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "reasoning-mesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "reasoning-mesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: pass (dict "root" $ "component" "router"). */}}
{{- define "reasoning-mesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "reasoning-mesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "reasoning-mesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "reasoning-mesh.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* A service's image: pass (dict "root" $ "values" <the service's values>). */}}
{{- define "reasoning-mesh.image" -}}
{{- $image := .values.image -}}
{{ $image.repository }}:{{ $image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- end }}

{{/* Where the solver finds the engine. */}}
{{- define "reasoning-mesh.engineUrl" -}}
{{- if eq .Values.engine.mode "external" -}}
{{ .Values.engine.externalUrl }}
{{- else if .Values.engine.gateway.enabled -}}
http://{{ include "reasoning-mesh.fullname" . }}-gateway:{{ .Values.engine.gateway.port }}
{{- else -}}
http://{{ include "reasoning-mesh.fullname" . }}-sglang:{{ .Values.engine.sglang.port }}
{{- end }}
{{- end }}

{{- define "reasoning-mesh.policyConfigMap" -}}
{{- default (printf "%s-policy" (include "reasoning-mesh.fullname" .)) .Values.policy.existingConfigMap }}
{{- end }}

{{/* "true" when the router keeps reviews in SQLite on a persistent volume. */}}
{{- define "reasoning-mesh.sqliteVolume" -}}
{{- if and (not .Values.reviewStore.postgresUrl) (not .Values.reviewStore.existingSecret) .Values.reviewStore.persistence.enabled -}}
true
{{- end -}}
{{- end }}

{{/* The Secret holding the mesh's shared service token. */}}
{{- define "reasoning-mesh.tokenSecret" -}}
{{- default (printf "%s-service-token" (include "reasoning-mesh.fullname" .)) .Values.meshAuth.tokenSecret }}
{{- end }}
